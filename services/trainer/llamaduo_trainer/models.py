"""What the base model is, checked from its config alone before any weight is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from llamaduo_trainer.errors import BASE_MODEL_NOT_FOUND, INVALID_TRAINING_CONFIG, NOT_A_CAUSAL_LM, TrainingError

ALL_LINEAR = "all-linear"


def is_local(base_model: Path | str) -> bool:
    """Whether `base_model` names a directory (or something shaped like a path) rather than a hub id."""
    if isinstance(base_model, Path):
        return True
    text = str(base_model)
    return Path(text).expanduser().exists() or text.startswith(("/", "./", "../", "~", ".")) or text.count("/") > 1


def load_base_config(base_model: Path | str) -> PretrainedConfig:
    """The base model's config; `base_model_not_found` when there is none (no such directory, hub id not cached)."""
    if is_local(base_model):
        path = Path(base_model).expanduser()
        if not path.is_dir():
            raise TrainingError(BASE_MODEL_NOT_FOUND, f"base model {base_model}: no such directory")
        if not (path / "config.json").is_file():
            raise TrainingError(BASE_MODEL_NOT_FOUND, f"base model {base_model}: the directory has no config.json")
    try:
        return cast(PretrainedConfig, AutoConfig.from_pretrained(base_model, local_files_only=is_local(base_model)))
    except OSError as exc:
        raise TrainingError(
            BASE_MODEL_NOT_FOUND,
            f"base model {base_model!r} is neither a model directory nor a hub id in the local cache (the trainer "
            f"does not download); put it in the cache or point spec.base_model.id at a directory ({exc})",
        ) from exc
    except (ValueError, KeyError) as exc:
        raise TrainingError(
            NOT_A_CAUSAL_LM, f"base model {base_model}: transformers does not know its model type ({exc})"
        ) from exc


def check_causal_lm(base_model: Path | str, config: PretrainedConfig) -> None:
    """Raise `not_a_causal_lm` unless `AutoModelForCausalLM` maps the config and its architectures to a causal LM.

    BERT is in the causal-LM mapping (as `BertLMHeadModel`), so the architectures the checkpoint was saved with count
    too: a `BertForMaskedLM` or `T5ForConditionalGeneration` checkpoint is refused before its weights are loaded.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = str(getattr(config, "model_type", ""))
    causal_classes: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal_classes.update([value] if isinstance(value, str) else value)
    architectures = list(getattr(config, "architectures", None) or [])
    if (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or getattr(config, "is_encoder_decoder", False)
        or (architectures and not any(name in causal_classes for name in architectures))
    ):
        saved_as = f" saved as {', '.join(architectures)}" if architectures else ""
        raise TrainingError(
            NOT_A_CAUSAL_LM,
            f"base model {base_model} ({model_type or 'unknown type'}{saved_as}) is not a causal language model; "
            "LoRA fine-tuning here needs a decoder-only model that AutoModelForCausalLM loads (Llama, Qwen, "
            "Mistral, SmolLM, ...)",
        )


def linear_paths(config: PretrainedConfig) -> list[str]:
    """The dotted names of the model's Linear layers, from a model built on the meta device (no weights, no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cast(torch.nn.Module, cast(Any, AutoModelForCausalLM).from_config(config))
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def linear_module_names(base_model: Path | str) -> list[str]:
    """Return the distinct short names of the model's Linear layers (what `lora.target_modules` may name)."""
    return sorted({path.rsplit(".", 1)[-1] for path in linear_paths(load_base_config(base_model))})


def check_target_modules(
    base_model: Path | str, target_modules: Sequence[str], config: PretrainedConfig | None = None
) -> None:
    """Raise `invalid_training_config` unless every target names (a suffix of) at least one Linear layer."""
    if not target_modules:
        raise TrainingError(
            INVALID_TRAINING_CONFIG,
            "lora.target_modules is empty: name the Linear layers to adapt, e.g. q_proj, v_proj",
        )
    if list(target_modules) == [ALL_LINEAR]:
        return
    config = config if config is not None else load_base_config(base_model)
    paths = linear_paths(config)
    # peft matches a list entry against a module's full name or any dotted suffix of it; mirror that rule.
    missing = [t for t in target_modules if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        names = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))
        raise TrainingError(
            INVALID_TRAINING_CONFIG,
            f"lora.target_modules {missing} match no Linear layer of the model ({config.model_type}); "
            f"its Linear modules are: {names}",
        )


__all__ = [
    "ALL_LINEAR",
    "check_causal_lm",
    "check_target_modules",
    "is_local",
    "linear_module_names",
    "linear_paths",
    "load_base_config",
]
