"""Loading local causal LMs: the bundled SmolLM2, converted model caches, tiny test models.

Nothing here imports torch or transformers at module import time: they come from the `local-model` extra and are
imported inside the functions that need them.
"""

from llamaduo.localmodel.loading import CHATML_TEMPLATE, load_causal_lm, load_tokenizer, nf4_config, pick_device
from llamaduo.localmodel.resolve import BUNDLED_MODELS, resolve_base_model
from llamaduo.localmodel.settings import DeviceSetting, LocalModelSettings
from llamaduo.localmodel.tiny import build_tiny_model

__all__ = [
    "BUNDLED_MODELS",
    "CHATML_TEMPLATE",
    "DeviceSetting",
    "LocalModelSettings",
    "build_tiny_model",
    "load_causal_lm",
    "load_tokenizer",
    "nf4_config",
    "pick_device",
    "resolve_base_model",
]
