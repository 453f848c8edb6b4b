"""An edit as a value (EditSpec), its plan for a model, and applying it: permanent weights, reversible weights, runtime
hooks, induction baking.
"""
