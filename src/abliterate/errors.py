"""Exception types. Every message is one line naming the problem and the fix."""

from __future__ import annotations


class AbliterateError(Exception):
    """Base class for every error abliterate raises on bad input."""


class ModelLoadError(AbliterateError):
    """The model could not be found or loaded."""


class ChatTemplateError(AbliterateError):
    """The tokenizer has no chat template and none was given."""


class ArchitectureError(AbliterateError):
    """The model's layers or residual writers could not be found."""


class PromptError(AbliterateError):
    """A prompt set is empty, too small or malformed."""


class DirectionError(AbliterateError):
    """A direction has the wrong shape, a zero norm or non-finite values."""


class LayerError(AbliterateError):
    """A layer index is out of range."""


class OutputError(AbliterateError):
    """An output path is unusable (exists, is the input, ...)."""


class CapabilityError(AbliterateError):
    """lm-evaluation-harness is missing, a benchmark task is unknown or its settings are unusable."""


class OptionError(AbliterateError):
    """A command's options do not fit together, or one is out of range."""
