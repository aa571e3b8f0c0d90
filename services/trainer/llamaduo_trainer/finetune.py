"""LoRA / QLoRA fine-tuning of a causal LM on chat rows with trl's `SFTTrainer`: plain domain logic, no bus, no store.

The precision follows `training.quantization` and the hardware:

| device | quantization    | precision       | how                                                                   |
| ------ | --------------- | --------------- | --------------------------------------------------------------------- |
| CUDA   | auto, 4bit      | `qlora-nf4`     | bitsandbytes 4-bit NF4, double quant, bf16 compute, checkpointing     |
| CUDA   | none            | `bf16-lora`     | bf16 base weights (`fp16-lora` on GPUs without bf16), checkpointing   |
| CPU    | auto, none      | `fp32-lora`     | fp32 base weights, no checkpointing                                   |
| CPU    | 4bit            | `cpu-4bit-lora` | bitsandbytes 4-bit NF4 on CPU, fp32 compute and fp32 adapter weights  |
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, cast

import datasets
import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    SchedulerType,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from llamaduo.contract.spec import LoraSpec, TrainingSpec, lora_shape
from llamaduo.data.rows import ChatRow, validate_turns
from llamaduo.localmodel import load_causal_lm, load_tokenizer, nf4_config, pick_device

logger = logging.getLogger(__name__)

Precision = Literal["fp32-lora", "bf16-lora", "fp16-lora", "qlora-nf4", "cpu-4bit-lora"]
StepCallback = Callable[[int, int, float | None], None]
"""`on_step(step, total_steps, loss)`: called once per optimizer step; `loss` is None when the step logged none."""

CUDA_EXTRA = "pip install llamaduo-trainer[cuda]"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ALL_LINEAR = "all-linear"
_QUANTIZED: frozenset[Precision] = frozenset({"qlora-nf4", "cpu-4bit-lora"})


@dataclass(frozen=True)
class TrainResult:
    """What one fine-tuning run did."""

    steps: int
    train_loss: float | None
    seconds: float
    tokens: int
    tokens_per_second: float
    precision: str
    log_history: list[dict[str, float]]


def chat_examples(rows: Sequence[ChatRow]) -> list[dict[str, list[dict[str, str]]]]:
    """Turn chat rows into trl's conversational prompt-completion examples, so only the final answer carries loss."""
    if not rows:
        raise ValueError("no training rows: fine-tuning needs at least one chat row")
    examples: list[dict[str, list[dict[str, str]]]] = []
    for index, row in enumerate(rows):
        # DatasetError is a ValueError; its message names the row and what is wrong with it.
        validate_turns(row, f"training row {index}")
        examples.append(
            {
                "prompt": [message.model_dump() for message in row.prompt_messages],
                "completion": [row.messages[-1].model_dump()],
            }
        )
    return examples


def choose_precision(device: str, quantization: str, *, bf16_supported: bool | None = None) -> Precision:
    """Pick the training precision for a resolved device (`cpu`, `cuda`, `cuda:N`) and `training.quantization`."""
    if quantization not in ("auto", "none", "4bit"):
        raise ValueError(f"unknown training.quantization {quantization!r}; expected auto, none or 4bit")
    if device.startswith("cuda"):
        if quantization in ("auto", "4bit"):
            return "qlora-nf4"
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return "bf16-lora" if bf16_supported else "fp16-lora"
    if quantization == "4bit":
        return "cpu-4bit-lora"
    return "fp32-lora"


def linear_module_names(base_model: Path | str) -> list[str]:
    """Return the distinct short names of the model's Linear layers (what `lora.target_modules` may name)."""
    _, paths = _linear_paths(base_model)
    return sorted({path.rsplit(".", 1)[-1] for path in paths})


def check_target_modules(base_model: Path | str, target_modules: Sequence[str]) -> None:
    """Raise ValueError unless every target module names (a suffix of) at least one Linear layer of the model."""
    if not target_modules:
        raise ValueError("lora.target_modules is empty: name the Linear layers to adapt, e.g. q_proj, v_proj")
    if list(target_modules) == [ALL_LINEAR]:
        return
    model_type, paths = _linear_paths(base_model)
    # peft matches a list entry against a module's full name or any dotted suffix of it; mirror that rule.
    missing = [t for t in target_modules if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        names = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))
        raise ValueError(
            f"lora.target_modules {missing} match no Linear layer of the model ({model_type}); "
            f"its Linear modules are: {names}"
        )


def _linear_paths(base_model: Path | str) -> tuple[str, list[str]]:
    # Built on the meta device from the config alone: no weights read, no memory used, even for a 70B model.
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(base_model, local_files_only=Path(base_model).is_dir())
    with init_empty_weights():
        model = cast(torch.nn.Module, cast(Any, AutoModelForCausalLM).from_config(config))
    paths = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    return str(config.model_type), paths


def _import_bitsandbytes() -> ModuleType:
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ImportError(
            f"4-bit (QLoRA) training needs bitsandbytes, which is not installed; install it with `{CUDA_EXTRA}` "
            "or set training.quantization to 'none'"
        ) from exc


def _cuda_half_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _load_model(base_model: Path | str, device: str, precision: Precision) -> PreTrainedModel:
    if precision == "fp32-lora":
        return load_causal_lm(base_model, device, torch.float32)
    if precision in ("bf16-lora", "fp16-lora"):
        return load_causal_lm(base_model, device, torch.bfloat16 if precision == "bf16-lora" else torch.float16)
    on_cuda = precision == "qlora-nf4"
    # fp32 compute on CPU: bf16 matmuls there buy little speed and cost gradient accuracy.
    compute_dtype = _cuda_half_dtype() if on_cuda else torch.float32
    quantization_config = nf4_config(compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        base_model,
        quantization_config=quantization_config,
        dtype=compute_dtype,
        device_map={"": device},
        local_files_only=Path(base_model).is_dir(),
    )
    # Casts norms to fp32 and, with checkpointing, makes the inputs require grad so gradients reach the adapters.
    return cast(
        PreTrainedModel,
        cast(Any, prepare_model_for_kbit_training)(
            model,
            use_gradient_checkpointing=on_cuda,
            gradient_checkpointing_kwargs={"use_reentrant": False} if on_cuda else None,
        ),
    )


def _sft_config(training: TrainingSpec, precision: Precision, scratch_dir: Path) -> SFTConfig:
    on_cuda = precision in ("qlora-nf4", "bf16-lora", "fp16-lora")
    half_bf16 = on_cuda and (precision == "bf16-lora" or (precision == "qlora-nf4" and torch.cuda.is_bf16_supported()))
    return SFTConfig(
        output_dir=str(scratch_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        # transformers 5 dropped warmup_ratio: a float below 1 in warmup_steps is read as a share of the total steps.
        warmup_steps=training.warmup_ratio,
        max_length=training.max_length,
        seed=training.seed,
        completion_only_loss=True,
        packing=False,
        # SFTConfig defaults to bf16 autocast everywhere; on CPU that would silently replace the fp32 path.
        bf16=half_bf16,
        fp16=on_cuda and not half_bf16,
        use_cpu=not on_cuda,
        # Checkpointing trades ~20% speed for memory: worth it on a GPU, pointless for small CPU runs.
        activation_checkpointing=on_cuda,
        activation_checkpointing_kwargs={"use_reentrant": False} if on_cuda else None,
        dataloader_pin_memory=on_cuda,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


class _ProgressCallback(TrainerCallback):
    """Forwards each optimizer step, with its logged loss, to the caller's `on_step`."""

    def __init__(self, on_step: StepCallback) -> None:
        self._on_step = on_step
        self._reported = 0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Report a step that will not be logged (DefaultFlowCallback has already decided that, it runs first)."""
        if not control.should_log:
            self._report(state, None)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Report a logged step with its loss; the end-of-training summary log has no `loss` and is skipped."""
        if logs is not None and "loss" in logs:
            self._report(state, float(logs["loss"]))

    def _report(self, state: TrainerState, loss: float | None) -> None:
        if state.global_step > self._reported:
            self._reported = state.global_step
            self._on_step(state.global_step, state.max_steps, loss)


@contextmanager
def _datasets_progress_off() -> Iterator[None]:
    # trl tokenises through `Dataset.map`, which draws a progress bar per pass; the service logs its own progress.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def build_sft_trainer(
    base_model: Path | str,
    rows: Sequence[ChatRow],
    scratch_dir: Path,
    *,
    lora: LoraSpec,
    training: TrainingSpec,
    device: str = "auto",
    on_step: StepCallback | None = None,
) -> tuple[SFTTrainer, Precision]:
    """Validate the inputs, load the model at the right precision and return a ready `SFTTrainer` (not yet trained).

    `base_model` is a local model directory (as `llamaduo.localmodel.resolve_base_model` returns) or a cached hub id.
    `scratch_dir` is the trainer's `output_dir`; nothing is saved there (`save_strategy="no"`).
    """
    examples = chat_examples(rows)
    try:
        SchedulerType(training.lr_scheduler)
    except ValueError as exc:
        known = ", ".join(s.value for s in SchedulerType)
        raise ValueError(f"unknown training.lr_scheduler {training.lr_scheduler!r}; known: {known}") from exc
    resolved = pick_device(device)
    precision = choose_precision(resolved, training.quantization)
    if precision in _QUANTIZED:
        _import_bitsandbytes()  # fail before any loading when the extra is missing
    check_target_modules(base_model, lora.target_modules)

    tokenizer = load_tokenizer(base_model)
    model = _load_model(base_model, resolved, precision)
    # The KV cache is useless while training and conflicts with activation checkpointing.
    model.config.use_cache = False
    targets = list(lora.target_modules)
    # A 4-bit model stores two weights per byte: numel() undercounts it by half.
    parameters = sum(p.numel() for p in model.parameters()) * (2 if precision in _QUANTIZED else 1)
    rank, alpha = lora_shape(lora, parameters)
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _datasets_progress_off():
        trainer = SFTTrainer(
            model=model,
            args=_sft_config(training, precision, scratch_dir),
            train_dataset=datasets.Dataset.from_list(examples),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[_ProgressCallback(on_step)] if on_step is not None else None,
        )
    # disable_tqdm swaps the progress bar for a callback that prints every log line to stdout.
    trainer.remove_callback(PrinterCallback)
    if precision == "cpu-4bit-lora":
        _prepare_cpu_4bit(cast(torch.nn.Module, trainer.model))
    _check_truncation(trainer.train_dataset, len(examples), training.max_length)
    return trainer, precision


def _prepare_cpu_4bit(model: torch.nn.Module) -> None:
    bnb = _import_bitsandbytes()
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


def _check_truncation(dataset: Any, rows: int, max_length: int) -> None:
    if not isinstance(dataset, datasets.Dataset):
        return
    kept = len(dataset)
    # trl silently drops rows whose prompt alone fills max_length: they would have no answer token to learn from.
    if kept == 0:
        raise ValueError(
            f"every training row's prompt fills training.max_length={max_length} tokens, leaving no answer token "
            "to train on; raise training.max_length"
        )
    if kept < rows:
        logger.warning(
            "%d of %d training rows dropped: the prompt alone fills max_length=%d tokens", rows - kept, rows, max_length
        )
    import pyarrow.compute as pc

    # Counted in Arrow: turning every row into Python lists would cost gigabytes on a 256k-row dataset.
    # The arrow format honours the indices mapping that trl's filter leaves (`dataset.data` would not).
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"])
    cut = pc.sum(pc.greater_equal(lengths, max_length)).as_py() or 0
    if cut:
        logger.warning(
            "%d training rows reach max_length=%d tokens: their answers are cut short and lose the end-of-turn token",
            cut,
            max_length,
        )


def train_adapter(
    base_model: Path | str,
    rows: Sequence[ChatRow],
    out_dir: Path,
    *,
    lora: LoraSpec,
    training: TrainingSpec,
    device: str = "auto",
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on `rows` and save only the adapter and the tokenizer into `out_dir`.

    The result loads with `PeftModel.from_pretrained(base, out_dir)`. An exception raised by `on_step` aborts the run.
    """
    with tempfile.TemporaryDirectory(prefix="llamaduo-sft-") as scratch:
        trainer, precision = build_sft_trainer(
            base_model, rows, Path(scratch), lora=lora, training=training, device=device, on_step=on_step
        )
        try:
            logger.info("training a LoRA adapter (%s) on %d rows", precision, len(rows))
            started = time.perf_counter()
            output = trainer.train()
            seconds = time.perf_counter() - started
            out_dir.mkdir(parents=True, exist_ok=True)
            cast(PeftModel, trainer.model).save_pretrained(str(out_dir))
            cast(PreTrainedTokenizerBase, trainer.processing_class).save_pretrained(out_dir)
            # peft also writes a model card; the artifact is the adapter and the tokenizer only.
            (out_dir / "README.md").unlink(missing_ok=True)
            history = [_numeric(entry) for entry in trainer.state.log_history]
            steps = trainer.state.global_step
        finally:
            # A long-lived worker trains again and again: drop the model now rather than whenever gc gets to it.
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    # trl's `num_tokens` is cumulative: the non-padding tokens (prompt and answer) seen so far.
    tokens = int(max((entry["num_tokens"] for entry in history if "num_tokens" in entry), default=0))
    loss = float(output.training_loss) if steps else None
    result = TrainResult(
        steps=steps,
        train_loss=loss,
        seconds=seconds,
        tokens=tokens,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        precision=precision,
        log_history=history,
    )
    logger.info(
        "trained %d steps in %.1f s (%.0f tokens/s), loss %s",
        steps,
        seconds,
        result.tokens_per_second,
        "n/a" if loss is None or not math.isfinite(loss) else f"{loss:.4f}",
    )
    return result


def _numeric(entry: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in entry.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


__all__ = [
    "ADAPTER_FILES",
    "CUDA_EXTRA",
    "Precision",
    "StepCallback",
    "TrainResult",
    "build_sft_trainer",
    "chat_examples",
    "check_target_modules",
    "choose_precision",
    "linear_module_names",
    "train_adapter",
]
