"""Trainer callbacks: progress reports, the divergence guard, the best adapter by validation loss, checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llamaduo_trainer.errors import TRAINING_DIVERGED, TrainingError

StepCallback = Callable[[int, int, float | None], None]
"""`on_step(step, total_steps, loss)`: called once per optimizer step; `loss` is None when the step logged none."""
CheckpointCallback = Callable[[Path, int], None]
"""`on_checkpoint(folder, step)`: called right after a complete checkpoint was written to `folder`."""

CHECKPOINT_PREFIX = "checkpoint-"
DIVERGENCE_FACTOR = 10.0


class ProgressCallback(TrainerCallback):
    """Forwards each optimizer step, with its logged loss, to the caller's `on_step`.

    A step that ends with a checkpoint is reported once the checkpoint is written (and handed to `on_checkpoint`), so a
    caller that stops the run from `on_step` never loses that step's checkpoint.
    """

    def __init__(self, on_step: StepCallback, on_tokens: Callable[[int], None] | None = None) -> None:
        self._on_step = on_step
        self._on_tokens = on_tokens
        self._reported = 0
        self._pending: tuple[int, int, float | None] | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Report a step that will not be logged (DefaultFlowCallback has already decided that, it runs first)."""
        if not control.should_log:
            self._report_after_save(state, control, None)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Report a logged step with its loss; the end-of-training summary log has no `loss` and is skipped."""
        if logs is not None and "num_tokens" in logs and self._on_tokens is not None:
            # trl's running count of real (non-padding) tokens trained on, before the step it belongs to is reported.
            self._on_tokens(int(logs["num_tokens"]))
        if logs is not None and "loss" in logs:
            self._report_after_save(state, control, float(logs["loss"]))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """The step's checkpoint is written: report the step now."""
        self._flush()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A report still waiting for a save that did not come goes out before the next step."""
        self._flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Likewise at the end of training."""
        self._flush()

    def _report_after_save(self, state: TrainerState, control: TrainerControl, loss: float | None) -> None:
        if state.global_step <= self._reported:
            return
        self._reported = state.global_step
        self._pending = (state.global_step, state.max_steps, loss)
        if not control.should_save:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._on_step(*pending)


class DivergenceGuard(TrainerCallback):
    """Stops a run whose loss is NaN/inf, or (after warmup) more than `factor` times the run's first logged loss."""

    def __init__(self, factor: float = DIVERGENCE_FACTOR) -> None:
        self.factor = factor

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Raise `training_diverged` from inside the loop, so no further step runs."""
        if logs is None or "loss" not in logs:
            return
        loss, step = float(logs["loss"]), state.global_step
        advice = f"lower training.learning_rate (now {args.learning_rate:g})"
        if not math.isfinite(loss):
            raise TrainingError(TRAINING_DIVERGED, f"training diverged at step {step}: the loss is {loss}; {advice}")
        # log_history already holds this entry; on a resumed run it starts with the original run's first loss.
        first = next(float(entry["loss"]) for entry in state.log_history if "loss" in entry)
        if step > args.get_warmup_steps(state.max_steps) and first > 0 and loss > self.factor * first:
            raise TrainingError(
                TRAINING_DIVERGED,
                f"training diverged at step {step}: the loss is {loss:.4g}, more than {self.factor:g}x the first "
                f"logged loss {first:.4g}; {advice}",
            )


class BestAdapter(TrainerCallback):
    """Keeps a copy of the trainable (LoRA) weights at the lowest validation loss, to restore when training ends.

    The copy lives in memory and goes into every checkpoint folder (`best_adapter.safetensors`), so a resumed run
    on another worker still ends with the best adapter, not the last.
    """

    WEIGHTS = "best_adapter.safetensors"
    META = "best_adapter.json"

    def __init__(self) -> None:
        self.loss: float | None = None
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Take a copy when this validation loss is the lowest so far."""
        loss = (metrics or {}).get("eval_loss")
        if model is None or loss is None or not math.isfinite(loss):
            return
        if self.loss is None or loss < self.loss:
            self.loss, self.step = float(loss), state.global_step
            self.weights = {
                name: param.detach().to("cpu", copy=True)
                for name, param in model.named_parameters()
                if param.requires_grad
            }

    def restore(self, model: torch.nn.Module) -> bool:
        """Put the best weights back into `model`; False when there is no copy."""
        if self.weights is None:
            return False
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.weights:
                    param.copy_(self.weights[name].to(param.device, param.dtype))
        return True

    def save(self, folder: Path) -> None:
        """Write the copy into a checkpoint folder."""
        if self.weights is None:
            return
        save_file({name: tensor.contiguous() for name, tensor in self.weights.items()}, folder / self.WEIGHTS)
        (folder / self.META).write_text(json.dumps({"step": self.step, "eval_loss": self.loss}))

    def load(self, folder: Path) -> None:
        """Take the copy a checkpoint folder holds, if any."""
        if not (folder / self.WEIGHTS).is_file() or not (folder / self.META).is_file():
            return
        meta = json.loads((folder / self.META).read_text())
        self.weights = load_file(folder / self.WEIGHTS)
        self.step, self.loss = int(meta["step"]), float(meta["eval_loss"])


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping on the validation loss, without its warning about `load_best_model_at_end`:
    `BestAdapter` keeps the best weights instead.
    """

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Nothing to check: `finetune` sets `metric_for_best_model` and step evaluation whenever it adds this."""


class Checkpoints(TrainerCallback):
    """Saves a full trainer checkpoint every `every` optimizer steps, keeps only the latest, hands it to the caller."""

    def __init__(self, every: int, on_checkpoint: CheckpointCallback | None, best: BestAdapter | None) -> None:
        self.every = every
        self.on_checkpoint = on_checkpoint
        self.best = best

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Skip the Trainer's extra save at the last step unless it is a checkpoint step: the adapter follows anyway."""
        if state.global_step >= state.max_steps and state.global_step % self.every:
            control.should_save = False

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Add the best adapter to the checkpoint just written, drop the older ones, then call `on_checkpoint`."""
        run_dir = Path(args.output_dir or ".")
        folder = run_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if not args.should_save or not folder.is_dir():
            return
        if self.best is not None:
            self.best.save(folder)
        for other in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if other != folder and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
        if self.on_checkpoint is not None and state.global_step % self.every == 0:
            self.on_checkpoint(folder, state.global_step)


__all__ = [
    "BestAdapter",
    "CheckpointCallback",
    "Checkpoints",
    "DivergenceGuard",
    "EarlyStopping",
    "ProgressCallback",
    "StepCallback",
]
