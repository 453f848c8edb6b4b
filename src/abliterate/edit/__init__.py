"""An edit as a value (EditSpec), its plan for a model, and applying it: permanent weights, reversible weights, runtime
hooks, induction baking.
"""

from abliterate.edit.direction_edit import DirectionEdit, edit_plan
from abliterate.edit.interventions import ablate, add, induce
from abliterate.edit.plan import AppliedEdit, Directions, EditPlan, applied, apply_plan, build_plan, untie_embeddings
from abliterate.edit.spec import EditSpec, Kernel
from abliterate.edit.weights import EditReport, bake_induction, orthogonalize

__all__ = [
    "ablate",
    "add",
    "applied",
    "AppliedEdit",
    "apply_plan",
    "bake_induction",
    "build_plan",
    "DirectionEdit",
    "Directions",
    "edit_plan",
    "EditPlan",
    "EditReport",
    "EditSpec",
    "induce",
    "Kernel",
    "orthogonalize",
    "untie_embeddings",
]
