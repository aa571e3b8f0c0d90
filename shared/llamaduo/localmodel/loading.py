"""Loading tokenizers and causal LMs onto the right device with sensible defaults."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# ChatML, the format SmolLM2 and many small instruct models were trained on; used only when a tokenizer has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _local_only(path: Path | str) -> bool:
    return isinstance(path, Path) or Path(path).is_dir()


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """Load a tokenizer that always has a pad token (eos when missing) and a chat template (ChatML when missing)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=_local_only(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def pick_device(setting: str) -> str:
    """Resolve `auto` to `cuda` when a GPU is visible, else `cpu`; reject `cuda` when there is none."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} requested but torch sees no CUDA device")
    if setting != "cpu" and not setting.startswith("cuda"):
        raise ValueError(f"unknown device {setting!r}; expected auto, cpu or cuda")
    return setting


def default_dtype(device: str) -> torch.dtype:
    """Return fp32 on CPU and bf16 (fp16 where unsupported) on CUDA."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def nf4_config(compute_dtype: torch.dtype) -> Any:
    """The QLoRA quantization (bitsandbytes): 4-bit NF4 weights, double quantization, `compute_dtype` matmuls."""
    from transformers import BitsAndBytesConfig

    return cast(Any, BitsAndBytesConfig)(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_causal_lm(
    path: Path | str, device: str = "auto", dtype: torch.dtype | None = None, *, load_in_4bit: bool = False
) -> PreTrainedModel:
    """Load a causal LM in eval mode on `device` (fp32 on CPU, bf16 on CUDA unless `dtype` says otherwise).

    `load_in_4bit` quantizes the weights to NF4 with bitsandbytes as they load (CUDA only).
    """
    from transformers import AutoModelForCausalLM

    resolved = pick_device(device)
    chosen = dtype or default_dtype(resolved)
    extra: dict[str, Any] = {}
    if load_in_4bit:
        if not resolved.startswith("cuda"):
            raise ValueError("4-bit loading needs a CUDA device; on a CPU use full precision (quantization: none)")
        extra["quantization_config"] = nf4_config(chosen)
    # from_pretrained returns the model in eval mode; device_map places the weights directly on the device.
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        path, dtype=chosen, device_map=resolved, local_files_only=_local_only(path), **extra
    )
    return model
