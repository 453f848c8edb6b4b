"""abliterate: find, remove and induce behaviour directions in Hugging Face causal LMs.

The user's verbs live here: load a model, capture activations, compute directions, edit (at runtime or in the
weights), run the whole pipeline, evaluate a model. Everything else is imported from its subpackage
(``abliterate.edit``, ``abliterate.select``, ...).
"""

from abliterate.edit import EditSpec, ablate, add, bake_induction, induce, orthogonalize
from abliterate.errors import (
    AbliterateError,
    ArchitectureError,
    ChatTemplateError,
    DirectionError,
    LayerError,
    ModelLoadError,
    OptionError,
    OutputError,
    PromptError,
)
from abliterate.lm import LoadedModel, load_model
from abliterate.measure import Activations, Direction, DirectionSet, directions
from abliterate.measure.capture import capture
from abliterate.run import EvalOptions, RunConfig, RunResult, evaluate, run
from abliterate.version import __version__ as __version__

# ``run`` and ``evaluate`` are the functions; their subpackages are imported by path (``from abliterate.run.config
# import SearchConfig``, ``from abliterate.evaluate import MarkerJudge``).
__all__ = [
    # load and measure
    "load_model",
    "LoadedModel",
    "capture",
    "Activations",
    "directions",
    "Direction",
    "DirectionSet",
    # edit
    "ablate",
    "induce",
    "add",
    "orthogonalize",
    "bake_induction",
    "EditSpec",
    # the pipeline
    "run",
    "RunConfig",
    "RunResult",
    "evaluate",
    "EvalOptions",
    # errors
    "AbliterateError",
    "ArchitectureError",
    "ChatTemplateError",
    "DirectionError",
    "LayerError",
    "ModelLoadError",
    "OptionError",
    "OutputError",
    "PromptError",
]
