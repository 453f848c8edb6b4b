"""Architecture support as data: residual writers, name patterns, bias writers, the anatomy of a model, discovery and
verification of it on the model itself, miniatures, hyper-connection streams, writer projections.
"""
