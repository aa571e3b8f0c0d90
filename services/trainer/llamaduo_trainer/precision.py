"""Training precision by `training.quantization` and hardware, and loading the base model at that precision.

| device | quantization    | precision       | how                                                                   |
| ------ | --------------- | --------------- | --------------------------------------------------------------------- |
| CUDA   | auto, 4bit      | `qlora-nf4`     | bitsandbytes 4-bit NF4, double quant, bf16 compute                    |
| CUDA   | none            | `bf16-lora`     | bf16 base weights (`fp16-lora` on GPUs without bf16)                  |
| CPU    | auto, none      | `fp32-lora`     | fp32 base weights                                                     |
| CPU    | 4bit            | `cpu-4bit-lora` | bitsandbytes 4-bit NF4 on CPU, fp32 compute and fp32 adapter weights  |

Gradient checkpointing follows `training.gradient_checkpointing`; unset, it is on for CUDA and off on a CPU.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, cast

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, PreTrainedModel

from llamaduo.contract.spec import TrainingSpec
from llamaduo.localmodel import load_causal_lm, nf4_config, pick_device
from llamaduo_trainer.errors import INVALID_TRAINING_CONFIG, TrainingError

Precision = Literal["fp32-lora", "bf16-lora", "fp16-lora", "qlora-nf4", "cpu-4bit-lora"]
CUDA_EXTRA = "pip install llamaduo-trainer[cuda]"
QUANTIZED: frozenset[Precision] = frozenset({"qlora-nf4", "cpu-4bit-lora"})


def training_device(setting: str) -> str:
    """Resolve the device setting; under a distributed launcher each process takes the GPU of its local rank."""
    device = pick_device(setting)
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(local_rank)}"
    return device


def choose_precision(device: str, quantization: str, *, bf16_supported: bool | None = None) -> Precision:
    """Pick the training precision for a resolved device (`cpu`, `cuda`, `cuda:N`) and `training.quantization`."""
    if quantization not in ("auto", "none", "4bit"):
        raise TrainingError(
            INVALID_TRAINING_CONFIG, f"unknown training.quantization {quantization!r}; expected auto, none or 4bit"
        )
    if device.startswith("cuda"):
        if quantization in ("auto", "4bit"):
            return "qlora-nf4"
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return "bf16-lora" if bf16_supported else "fp16-lora"
    if quantization == "4bit":
        return "cpu-4bit-lora"
    return "fp32-lora"


def on_cuda(precision: Precision) -> bool:
    """Whether the precision is one of the CUDA ones."""
    return precision in ("qlora-nf4", "bf16-lora", "fp16-lora")


def gradient_checkpointing(training: TrainingSpec, precision: Precision) -> bool:
    """`training.gradient_checkpointing`, or by default on for CUDA (memory) and off on a CPU (speed)."""
    if training.gradient_checkpointing is not None:
        return training.gradient_checkpointing
    return on_cuda(precision)


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ImportError(
            f"4-bit (QLoRA) training needs bitsandbytes, which is not installed; install it with `{CUDA_EXTRA}` "
            "or set training.quantization to 'none'"
        ) from exc


def check_optimizer(training: TrainingSpec, device: str) -> None:
    """`paged_adamw_8bit` needs bitsandbytes and a CUDA device: refuse it up front otherwise."""
    if training.optimizer != "paged_adamw_8bit":
        return
    if not device.startswith("cuda"):
        raise TrainingError(
            INVALID_TRAINING_CONFIG,
            f"training.optimizer paged_adamw_8bit needs a CUDA GPU (this run is on {device}); use adamw_torch",
        )
    try:
        import_bitsandbytes()
    except ImportError as exc:
        raise TrainingError(
            INVALID_TRAINING_CONFIG,
            f"training.optimizer paged_adamw_8bit needs bitsandbytes, which is not installed; install it with "
            f"`{CUDA_EXTRA}` or use adamw_torch",
        ) from exc


def _cuda_half_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(base_model: Path | str, device: str, precision: Precision, *, checkpointing: bool) -> PreTrainedModel:
    """Load the base model for LoRA training at `precision` on `device`."""
    if precision == "fp32-lora":
        return load_causal_lm(base_model, device, torch.float32)
    if precision in ("bf16-lora", "fp16-lora"):
        return load_causal_lm(base_model, device, torch.bfloat16 if precision == "bf16-lora" else torch.float16)
    cuda = precision == "qlora-nf4"
    # fp32 compute on CPU: bf16 matmuls there buy little speed and cost gradient accuracy.
    compute_dtype = _cuda_half_dtype() if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base_model,
        quantization_config=nf4_config(compute_dtype),
        dtype=compute_dtype,
        device_map={"": device},
        local_files_only=Path(base_model).is_dir(),
    )
    # Casts norms to fp32 and, with checkpointing, makes the inputs require grad so gradients reach the adapters.
    return cast(
        PreTrainedModel,
        cast(Any, prepare_model_for_kbit_training)(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        ),
    )


def prepare_cpu_4bit(model: torch.nn.Module) -> None:
    """Make a CPU 4-bit LoRA model train correctly: no AVX512-BF16 repacking, fp32 adapter weights."""
    bnb = import_bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs the first no-grad eval forward repacks the 4-bit weights, after which LoRA gradients
            # are silently wrong (~2000x too small). Never repacking costs some generation speed and keeps them right.
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():
        # trl casts QLoRA adapters to bf16 (the paper's GPU recipe); on CPU fp32 adapters cost nothing and keep small
        # AdamW updates from rounding away, since no autocast runs there.
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


__all__ = [
    "CUDA_EXTRA",
    "QUANTIZED",
    "Precision",
    "check_optimizer",
    "choose_precision",
    "gradient_checkpointing",
    "import_bitsandbytes",
    "load_model",
    "on_cuda",
    "prepare_cpu_4bit",
    "training_device",
]
