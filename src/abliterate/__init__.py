"""abliterate: find, remove and induce behaviour directions in Hugging Face causal LMs."""

from . import directions
from .anatomy import Anatomy, Writer, find_anatomy
from .capture import Activations, capture
from .directions import Direction, DirectionSet
from .errors import (
    AbliterateError,
    ArchitectureError,
    ChatTemplateError,
    DirectionError,
    LayerError,
    ModelLoadError,
    OutputError,
    PromptError,
)
from .interventions import ablate, add, induce
from .loading import from_pretrained_objects, load_model
from .model import LoadedModel
from .plan import AppliedEdit, Directions, EditPlan, applied, apply_plan, build_plan, untie_embeddings
from .scorer import Score, Scorer
from .search import SearchResult, SearchSpace
from .space import EditSpec, Kernel
from .weights import EditReport, bake_induction, orthogonalize

__version__ = "0.1.0"

__all__ = [
    "AbliterateError",
    "Activations",
    "Anatomy",
    "AppliedEdit",
    "Directions",
    "EditPlan",
    "EditSpec",
    "Kernel",
    "Score",
    "Scorer",
    "SearchResult",
    "SearchSpace",
    "applied",
    "apply_plan",
    "build_plan",
    "ArchitectureError",
    "ChatTemplateError",
    "Direction",
    "DirectionError",
    "DirectionSet",
    "EditReport",
    "LayerError",
    "LoadedModel",
    "ModelLoadError",
    "OutputError",
    "PromptError",
    "Writer",
    "ablate",
    "add",
    "bake_induction",
    "capture",
    "directions",
    "find_anatomy",
    "from_pretrained_objects",
    "induce",
    "load_model",
    "orthogonalize",
    "untie_embeddings",
]
