"""The loaded language model: loading (hub id, folder, GGUF), the LoadedModel wrapper, chat templates, saving, the
offline demo model.
"""

from abliterate.lm.demo import demo_model_path
from abliterate.lm.loading import from_pretrained_objects, load_model
from abliterate.lm.model import LoadedModel
from abliterate.lm.saving import save_model

__all__ = [
    "demo_model_path",
    "from_pretrained_objects",
    "load_model",
    "LoadedModel",
    "save_model",
]
