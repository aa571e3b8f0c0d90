"""Training failures that no retry can fix, each with a machine-readable reason and a message a person can act on."""

from __future__ import annotations

from typing import Final

from llamaduo.contract.spec import TrainingSpec

BASE_MODEL_NOT_FOUND: Final = "base_model_not_found"
NOT_A_CAUSAL_LM: Final = "not_a_causal_lm"
NO_TRAINABLE_TOKENS: Final = "no_trainable_tokens"
OUT_OF_MEMORY: Final = "out_of_memory"
TRAINING_DIVERGED: Final = "training_diverged"
INVALID_TRAINING_CONFIG: Final = "invalid_training_config"
REASONS: Final = (
    BASE_MODEL_NOT_FOUND,
    NOT_A_CAUSAL_LM,
    NO_TRAINABLE_TOKENS,
    OUT_OF_MEMORY,
    TRAINING_DIVERGED,
    INVALID_TRAINING_CONFIG,
)

# What allocators say when they run out: torch.cuda.OutOfMemoryError ("CUDA out of memory"), bitsandbytes and cuBLAS
# ("out of memory"), and the CPU allocator ("DefaultCPUAllocator: can't allocate memory ... Cannot allocate memory").
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


class TrainingError(ValueError):
    """A training task that can never succeed as specified; `reason` is one of `REASONS`, the message says what to do.

    A ValueError, so that callers that treat bad input as ValueError keep doing so.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[TrainingError], tuple[str, str]]:
        # Keeps the reason when the error crosses a process boundary (pickling calls __init__ with these arguments).
        return type(self), (self.reason, str(self))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocator running out of memory (GPU or CPU), not some other runtime error."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in _OOM_MARKERS)


def out_of_memory(
    training: TrainingSpec, device: str, exc: BaseException, *, while_loading: bool = False
) -> TrainingError:
    """The `out_of_memory` error for a run of `training` on `device`, naming the settings to lower."""
    if while_loading:
        hint = (
            "the base model does not fit: use a smaller base model, or training.quantization '4bit' on a CUDA GPU"
            if device.startswith("cuda")
            else "the base model does not fit in this machine's memory: use a smaller base model"
        )
        return TrainingError(OUT_OF_MEMORY, f"out of memory on {device} while loading the base model; {hint} ({exc})")
    checkpointing = training.gradient_checkpointing
    lower = [
        f"training.batch_size={training.batch_size} (raise training.gradient_accumulation_steps="
        f"{training.gradient_accumulation_steps} to keep the effective batch)",
        f"training.max_length={training.max_length}",
    ]
    if checkpointing is False or (checkpointing is None and not device.startswith("cuda")):
        lower.append("or turn training.gradient_checkpointing on")
    if device.startswith("cuda") and training.quantization == "none":
        lower.append("or set training.quantization to '4bit'")
    return TrainingError(
        OUT_OF_MEMORY,
        f"out of memory on {device} training with batch_size={training.batch_size}, gradient_accumulation_steps="
        f"{training.gradient_accumulation_steps}, max_length={training.max_length}; lower "
        + ", ".join(lower)
        + f" ({type(exc).__name__}: {str(exc)[:300]})",
    )


__all__ = [
    "BASE_MODEL_NOT_FOUND",
    "INVALID_TRAINING_CONFIG",
    "NOT_A_CAUSAL_LM",
    "NO_TRAINABLE_TOKENS",
    "OUT_OF_MEMORY",
    "REASONS",
    "TRAINING_DIVERGED",
    "TrainingError",
    "is_out_of_memory",
    "out_of_memory",
]
