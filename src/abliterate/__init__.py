"""abliterate: find, remove and induce behaviour directions in Hugging Face causal LMs."""

from abliterate.arch.anatomy import Anatomy, Writer, find_anatomy
from abliterate.edit.interventions import ablate, add, induce
from abliterate.edit.plan import AppliedEdit, Directions, EditPlan, applied, apply_plan, build_plan, untie_embeddings
from abliterate.edit.spec import EditSpec, Kernel
from abliterate.edit.weights import EditReport, bake_induction, orthogonalize
from abliterate.errors import (
    AbliterateError,
    ArchitectureError,
    ChatTemplateError,
    DirectionError,
    LayerError,
    ModelLoadError,
    OutputError,
    PromptError,
)
from abliterate.lm.loading import from_pretrained_objects, load_model
from abliterate.lm.model import LoadedModel
from abliterate.measure import directions
from abliterate.measure.capture import Activations, capture
from abliterate.measure.directions import Direction, DirectionSet
from abliterate.select.scorer import Score, Scorer
from abliterate.select.search import SearchResult, SearchSpace
from abliterate.version import __version__ as __version__

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
