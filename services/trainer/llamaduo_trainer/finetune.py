"""LoRA / QLoRA fine-tuning of a causal LM on chat rows with trl's `SFTTrainer`: plain domain logic, no bus, no store.

One run: hold out a seeded validation share of the training rows (never the test split), tokenise with the chat
template so that only the final answer carries loss, load the base at the precision the hardware and
`training.quantization` call for (`precision.py`), train a fresh LoRA adapter or continue a previous one, evaluate
every `eval_steps`, stop early when the validation loss stops falling, and save the adapter with the lowest validation
loss. With `training.packing` each micro-batch's rows are concatenated into one padding-free sequence whose rows attend
only to themselves (`attention.py`); on a CPU the LM head runs only at answer positions (`sft.py`). Checkpoints
(`callbacks.py`) let an interrupted run resume exactly where it was. Failures that no retry can fix raise
`TrainingError` with a machine-readable reason (`errors.py`).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    SchedulerType,
    TrainerCallback,
)
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from llamaduo.contract.spec import LoraSpec, TrainingSpec, lora_shape
from llamaduo.data.rows import ChatRow
from llamaduo.localmodel import load_tokenizer
from llamaduo_trainer.attention import use_varlen_sdpa
from llamaduo_trainer.callbacks import (
    BestAdapter,
    CheckpointCallback,
    Checkpoints,
    DivergenceGuard,
    EarlyStopping,
    ProgressCallback,
    StepCallback,
)
from llamaduo_trainer.errors import (
    INVALID_TRAINING_CONFIG,
    REASONS,
    TrainingError,
    is_out_of_memory,
    out_of_memory,
)
from llamaduo_trainer.examples import (
    chat_examples,
    datasets_progress_off,
    tokenize_examples,
    validation_indices,
)
from llamaduo_trainer.manifest import base_model_fingerprint, library_versions, peak_memory_bytes, reset_peak_memory
from llamaduo_trainer.merge import merge_adapter
from llamaduo_trainer.models import (
    ALL_LINEAR,
    check_causal_lm,
    check_target_modules,
    linear_module_names,
    load_base_config,
)
from llamaduo_trainer.precision import (
    CUDA_EXTRA,
    QUANTIZED,
    Precision,
    check_optimizer,
    choose_precision,
    gradient_checkpointing,
    import_bitsandbytes,
    load_model,
    on_cuda,
    prepare_cpu_4bit,
    training_device,
)
from llamaduo_trainer.sft import LlamaDuoSFTTrainer

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EVALUATIONS_PER_RUN = 10


@dataclass(frozen=True)
class TrainResult:
    """What one fine-tuning run did."""

    steps: int
    train_loss: float | None
    seconds: float
    tokens: int
    """Real (non-padding) tokens trained on, prompt and answer, in this run (a resumed run: since resuming)."""
    tokens_per_second: float
    """`tokens` over the seconds spent training (validation passes excluded)."""
    precision: str
    log_history: list[dict[str, float]]
    eval_loss: float | None = None
    """The lowest validation loss (that of the saved adapter); None without validation."""
    best_step: int | None = None
    validation_rows: int = 0
    train_rows: int = 0
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    peak_memory_bytes: int = 0
    """CUDA max allocated during the run, or the process's peak resident set size on a CPU."""
    library_versions: dict[str, str] = field(default_factory=dict)
    packing: bool = False
    stopped_early: bool = False


def planned_steps(train_rows: int, training: TrainingSpec, processes: int = 1) -> int:
    """About how many optimizer steps the run takes (the Trainer's own count may differ by one)."""
    if training.max_steps:
        return training.max_steps
    micro_batches = math.ceil(train_rows / (training.batch_size * processes))
    per_epoch = max(1, math.ceil(micro_batches / training.gradient_accumulation_steps))
    return max(1, math.ceil(training.epochs * per_epoch))


def eval_interval(train_rows: int, training: TrainingSpec, processes: int = 1) -> int:
    """`training.eval_steps`, or about a tenth of the run, at least 1."""
    if training.eval_steps:
        return training.eval_steps
    return max(1, round(planned_steps(train_rows, training, processes) / EVALUATIONS_PER_RUN))


def _check_scheduler(training: TrainingSpec) -> None:
    try:
        SchedulerType(training.lr_scheduler)
    except ValueError as exc:
        known = ", ".join(s.value for s in SchedulerType)
        raise TrainingError(
            INVALID_TRAINING_CONFIG, f"unknown training.lr_scheduler {training.lr_scheduler!r}; known: {known}"
        ) from exc


def _sft_config(
    training: TrainingSpec,
    precision: Precision,
    output_dir: Path,
    *,
    eval_steps: int | None,
    save_steps: int | None,
) -> SFTConfig:
    cuda = on_cuda(precision)
    half_bf16 = cuda and (precision == "bf16-lora" or (precision == "qlora-nf4" and torch.cuda.is_bf16_supported()))
    checkpointing = gradient_checkpointing(training, precision)
    validating = eval_steps is not None
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        # transformers 5 dropped warmup_ratio: a float below 1 in warmup_steps is read as a share of the total steps.
        warmup_steps=training.warmup_ratio,
        optim=training.optimizer,
        # The rows arrive tokenised, labelled and cut to training.max_length (examples.py).
        max_length=None,
        packing=False,
        # Padding-free: a micro-batch's rows become one sequence with restarting position ids, no padding at all;
        # batch_size rows per micro-batch as without it, so steps, schedule and data order are the same.
        padding_free=training.packing,
        seed=training.seed,
        data_seed=training.seed,
        # SFTConfig defaults to bf16 autocast everywhere; on CPU that would silently replace the fp32 path.
        bf16=half_bf16,
        fp16=cuda and not half_bf16,
        use_cpu=not cuda,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        dataloader_pin_memory=cuda,
        logging_strategy="steps",
        logging_steps=1,
        # The Trainer would otherwise replace a NaN loss by the running mean and hide a diverged run.
        logging_nan_inf_filter=False,
        eval_strategy="steps" if validating else "no",
        eval_steps=eval_steps,
        prediction_loss_only=True,
        metric_for_best_model="eval_loss" if validating else None,
        greater_is_better=False if validating else None,
        # The best adapter is kept by BestAdapter (in memory and in every checkpoint), not by reloading a
        # checkpoint: checkpoints follow training.checkpoint_steps, not the evaluations.
        load_best_model_at_end=False,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        restore_callback_states_from_checkpoint=True,
        report_to="none",
        disable_tqdm=True,
    )


def _lora_model(model: PreTrainedModel, init_adapter: Path) -> PeftModel:
    if not (init_adapter / "adapter_config.json").is_file():
        raise TrainingError(
            INVALID_TRAINING_CONFIG,
            f"init_adapter {init_adapter} holds no PEFT adapter (no adapter_config.json) to continue training from",
        )
    try:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise TrainingError(
            INVALID_TRAINING_CONFIG,
            f"the previous adapter at {init_adapter} does not fit this base model ({exc}); train from the base "
            "(training.init_from: base)",
        ) from exc


def build_sft_trainer(
    base_model: Path | str,
    rows: Sequence[ChatRow],
    scratch_dir: Path,
    *,
    lora: LoraSpec,
    training: TrainingSpec,
    device: str = "auto",
    on_step: StepCallback | None = None,
    on_tokens: Callable[[int], None] | None = None,
    save_checkpoints: bool = False,
    on_checkpoint: CheckpointCallback | None = None,
    init_adapter: Path | None = None,
) -> tuple[SFTTrainer, Precision]:
    """Validate the inputs, load the model at the right precision and return a ready trainer (not yet trained).

    `base_model` is a local model directory (as `llamaduo.localmodel.resolve_base_model` returns) or a cached hub id.
    `scratch_dir` is the trainer's `output_dir`, where checkpoints go every `training.checkpoint_steps` steps when
    `save_checkpoints` (each then handed to `on_checkpoint`). The trainer is a `LlamaDuoSFTTrainer`; its
    `best_adapter` is None without validation rows.
    """
    examples = chat_examples(rows)  # validates every row before anything is loaded
    held_out = validation_indices(len(rows), training.validation_fraction, training.seed)
    _check_scheduler(training)
    resolved = training_device(device)
    precision = choose_precision(resolved, training.quantization)
    if precision in QUANTIZED:
        import_bitsandbytes()  # fail before any loading when the extra is missing
    check_optimizer(training, resolved)
    config = load_base_config(base_model)
    check_causal_lm(base_model, config)
    check_target_modules(base_model, lora.target_modules, config)

    tokenizer = load_tokenizer(base_model)
    train_set = tokenize_examples(
        [example for index, example in enumerate(examples) if index not in held_out], tokenizer, training.max_length
    )
    eval_set = None
    if held_out:
        try:
            eval_set = tokenize_examples(
                [examples[index] for index in sorted(held_out)],
                tokenizer,
                training.max_length,
                split="validation",
            )
        except TrainingError:
            logger.warning("no validation row has an answer token within max_length: training without validation")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    eval_steps = eval_interval(train_set.rows, training, processes) if eval_set is not None else None

    try:
        model = load_model(base_model, resolved, precision, checkpointing=gradient_checkpointing(training, precision))
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory(training, resolved, exc, while_loading=True) from exc
        raise
    # The KV cache is useless while training and conflicts with activation checkpointing.
    model.config.use_cache = False
    if training.packing:
        use_varlen_sdpa(model)

    peft_config = None
    trainable: PreTrainedModel | PeftModel = model
    if init_adapter is not None:
        trainable = _lora_model(model, init_adapter)
    else:
        targets = list(lora.target_modules)
        # A 4-bit model stores two weights per byte: numel() undercounts it by half.
        parameters = sum(p.numel() for p in model.parameters()) * (2 if precision in QUANTIZED else 1)
        rank, alpha = lora_shape(lora, parameters)
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=lora.dropout,
            target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
            bias="none",
            task_type="CAUSAL_LM",
        )

    best = BestAdapter() if eval_set is not None else None
    save_steps = training.checkpoint_steps if save_checkpoints and training.checkpoint_steps > 0 else None
    # In this order: a diverged step is not reported as progress; whether a step saves is settled before progress
    # is reported (after the save); the best adapter is updated before a checkpoint stores it.
    callbacks: list[TrainerCallback] = [DivergenceGuard()]
    if best is not None:
        callbacks.append(best)
        if training.early_stopping_patience is not None:
            callbacks.append(EarlyStopping(early_stopping_patience=training.early_stopping_patience))
    if save_steps is not None:
        callbacks.append(Checkpoints(save_steps, on_checkpoint, best))
    if on_step is not None:
        callbacks.append(ProgressCallback(on_step, on_tokens))
    with datasets_progress_off():
        trainer = LlamaDuoSFTTrainer(
            model=trainable,
            args=_sft_config(training, precision, scratch_dir, eval_steps=eval_steps, save_steps=save_steps),
            train_dataset=train_set.dataset,
            eval_dataset=eval_set.dataset if eval_set is not None else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            # trl's fused head already skips the prompt positions on CUDA (Triton); on a CPU it projects them all.
            answer_logits_only=not on_cuda(precision),
        )
    # disable_tqdm swaps the progress bar for a callback that prints every log line to stdout.
    trainer.remove_callback(PrinterCallback)
    if precision == "cpu-4bit-lora":
        prepare_cpu_4bit(cast(torch.nn.Module, trainer.model))
    trainer.best_adapter = best
    trainer.train_rows = train_set.rows
    trainer.validation_rows = eval_set.rows if eval_set is not None else 0
    trainer.device_name = resolved
    return trainer, precision


def _check_resume(resume_from: Path | None) -> None:
    if resume_from is not None and not (resume_from / "trainer_state.json").is_file():
        raise TrainingError(
            INVALID_TRAINING_CONFIG, f"resume_from {resume_from} is not a trainer checkpoint (no trainer_state.json)"
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
    on_tokens: Callable[[int], None] | None = None,
    checkpoint_dir: Path | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume_from: Path | None = None,
    init_adapter: Path | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on `rows` and save only the adapter and the tokenizer into `out_dir`.

    The result loads with `PeftModel.from_pretrained(base, out_dir)`; with validation it is the adapter of the lowest
    validation loss, else the last. An exception raised by `on_step` or `on_checkpoint` aborts the run (nothing is
    saved to `out_dir`).

    - `checkpoint_dir`: where full trainer checkpoints go every `training.checkpoint_steps` optimizer steps (only the
      latest is kept); `on_checkpoint(folder, step)` is called right after each one is complete.
    - `resume_from`: a checkpoint folder of the same run: training continues from it with the same steps, schedule
      and data order (same rows, spec and seed required).
    - `init_adapter`: a PEFT adapter directory whose weights training continues from, instead of a fresh LoRA.

    Raises `TrainingError` (`reason` in `errors.REASONS`) for runs that cannot succeed as specified.
    """
    _check_resume(resume_from)
    with tempfile.TemporaryDirectory(prefix="llamaduo-sft-") as scratch:
        run_dir = checkpoint_dir if checkpoint_dir is not None else Path(scratch)
        trainer, precision = build_sft_trainer(
            base_model,
            rows,
            run_dir,
            lora=lora,
            training=training,
            device=device,
            on_step=on_step,
            on_tokens=on_tokens,
            save_checkpoints=checkpoint_dir is not None,
            on_checkpoint=on_checkpoint,
            init_adapter=init_adapter,
        )
        ours = cast(LlamaDuoSFTTrainer, trainer)
        best: BestAdapter | None = ours.best_adapter
        resolved: str = ours.device_name
        try:
            if resume_from is not None and best is not None:
                best.load(resume_from)
            logger.info(
                "training a LoRA adapter (%s%s) on %d rows, %d held out for validation",
                precision,
                ", padding-free" if training.packing else "",
                ours.train_rows,
                ours.validation_rows,
            )
            reset_peak_memory(resolved)
            started = time.perf_counter()
            try:
                output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
            except TrainingError:
                raise
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise out_of_memory(training, resolved, exc) from exc
                raise
            seconds = time.perf_counter() - started
            state = trainer.state
            steps = state.global_step
            if best is not None and best.step is not None and best.step != steps:
                best.restore(cast(torch.nn.Module, trainer.model))
                logger.info("kept the adapter of step %d (validation loss %.4f), not the last", best.step, best.loss)
            out_dir.mkdir(parents=True, exist_ok=True)
            cast(PeftModel, trainer.model).save_pretrained(str(out_dir))
            cast(PreTrainedTokenizerBase, trainer.processing_class).save_pretrained(out_dir)
            # peft also writes a model card; the artifact is the adapter and the tokenizer only.
            (out_dir / "README.md").unlink(missing_ok=True)
            history = [_numeric(entry) for entry in state.log_history]
            stopped_early = steps < state.max_steps
            tokens = ours.real_tokens
            train_rows, validation_rows = ours.train_rows, ours.validation_rows
            peak = peak_memory_bytes(resolved)
        finally:
            # A long-lived worker trains again and again: drop the model now rather than whenever gc gets to it.
            del trainer, ours
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    loss = float(output.training_loss) if steps else None
    # Throughput of the training itself: the validation passes inside train() are not training tokens.
    training_seconds = seconds - sum(entry.get("eval_runtime", 0.0) for entry in history)
    result = TrainResult(
        steps=steps,
        train_loss=loss,
        seconds=seconds,
        tokens=tokens,
        tokens_per_second=tokens / training_seconds if training_seconds > 0 else 0.0,
        precision=precision,
        log_history=history,
        eval_loss=best.loss if best is not None else None,
        best_step=best.step if best is not None else None,
        validation_rows=validation_rows,
        train_rows=train_rows,
        loss_history=[(int(e["step"]), e["loss"]) for e in history if "loss" in e and "step" in e],
        eval_history=[(int(e["step"]), e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e],
        peak_memory_bytes=peak,
        library_versions=library_versions(),
        packing=training.packing,
        stopped_early=stopped_early,
    )
    logger.info(
        "trained %d steps in %.1f s (%.0f tokens/s), loss %s, validation loss %s",
        steps,
        seconds,
        result.tokens_per_second,
        _fmt(loss),
        _fmt(result.eval_loss),
    )
    return result


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"


def _numeric(entry: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in entry.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


__all__ = [
    "ADAPTER_FILES",
    "CUDA_EXTRA",
    "REASONS",
    "Precision",
    "StepCallback",
    "TrainResult",
    "TrainingError",
    "base_model_fingerprint",
    "build_sft_trainer",
    "chat_examples",
    "check_target_modules",
    "choose_precision",
    "eval_interval",
    "linear_module_names",
    "merge_adapter",
    "planned_steps",
    "train_adapter",
]
