"""Architecture support as data: residual writers, name patterns, bias writers, the anatomy of a model, discovery and
verification of it on the model itself, miniatures, hyper-connection streams, writer projections.
"""

from abliterate.arch.anatomy import Anatomy, find_anatomy
from abliterate.arch.discovery import discover_writers
from abliterate.arch.selfcheck import checked_anatomy
from abliterate.arch.verify import Verification, verify_anatomy
from abliterate.arch.writer import Writer

__all__ = [
    "Anatomy",
    "checked_anatomy",
    "discover_writers",
    "find_anatomy",
    "Verification",
    "verify_anatomy",
    "Writer",
]
