"""The base model with a LoRA adapter merged in, saved as a plain transformers model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from llamaduo.localmodel import load_causal_lm, load_tokenizer, pick_device
from llamaduo_trainer.errors import INVALID_TRAINING_CONFIG, TrainingError
from llamaduo_trainer.models import load_base_config

logger = logging.getLogger(__name__)

_SAVED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _saved_dtype(config: Any) -> torch.dtype:
    """The dtype the base checkpoint was saved in (config.dtype), fp32 when it says nothing usable."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype) and value in _SAVED_DTYPES.values():
        return value
    return _SAVED_DTYPES.get(str(value).removeprefix("torch."), torch.float32)


def merge_adapter(base_model: Path | str, adapter_dir: Path, out_dir: Path, device: str = "cpu") -> Path:
    """Base + adapter merged, saved as full safetensors (+ tokenizer, config) in out_dir, loadable with from_pretrained.

    The base is loaded unquantised in the dtype it was saved in (a QLoRA adapter merges into the full weights, not
    into 4-bit ones); the tokenizer is the adapter's when it carries one, else the base's.
    """
    config = load_base_config(base_model)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TrainingError(INVALID_TRAINING_CONFIG, f"{adapter_dir} holds no PEFT adapter (no adapter_config.json)")
    dtype = _saved_dtype(config)
    model = load_causal_lm(base_model, pick_device(device), dtype)
    merged = cast(PreTrainedModel, PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload())
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_model
    load_tokenizer(tokenizer_source).save_pretrained(out_dir)
    logger.info("merged %s into %s (%s) at %s", adapter_dir, base_model, dtype, out_dir)
    return out_dir


__all__ = ["merge_adapter"]
