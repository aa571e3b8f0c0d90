"""One training task: dataset.ready in, adapter artifact and model.trained out (idempotent, resumable).

Outputs under `iter-NNNN/adapter/`: `adapter.tar` (PEFT adapter + tokenizer + `adapter_manifest.json`),
`manifest.json` (the same manifest, readable without unpacking), optionally `merged.tar`, and `training.json` written
last: its presence means the whole output exists and a redelivered task only re-emits. While training, a checkpoint
goes to `checkpoint.tar` every `training.checkpoint_steps` steps, committed by `checkpoint.json` written after it; a
redelivered task whose run matches (same dataset, settings and starting adapter) resumes from it.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import ArtifactRef, DatasetReady, Event, ModelTrained
from llamaduo.data import DatasetManifest, dump_jsonl, read_manifest, read_training_rows
from llamaduo.localmodel import resolve_base_model
from llamaduo.store import ArtifactStore, artifact_key
from llamaduo.store.archive import TAR_MEDIA_TYPE, pack_dir, unpack_dir
from llamaduo.store.outputs import StageOutputs
from llamaduo_trainer.checkpoints import CheckpointStore, run_id
from llamaduo_trainer.finetune import (
    TrainingError,
    TrainResult,
    base_model_fingerprint,
    merge_adapter,
    train_adapter,
)
from llamaduo_trainer.launch import Job, run_data_parallel
from llamaduo_trainer.settings import TrainerSettings

RESULT_MEDIA_TYPE = "application/vnd.llamaduo.training-result+json"
MANIFEST_MEDIA_TYPE = "application/vnd.llamaduo.adapter-manifest+json"
MANIFEST_FILE = "adapter_manifest.json"

StepCallback = Callable[[int, int, float | None], None]


def _finite(value: float | None) -> float | None:
    """NaN (a diverged run) is not JSON: record it as unknown."""
    return value if value is not None and math.isfinite(value) else None


class TrainingMeter:
    """Turns step reports into the progress line people read: step loss, real tokens per second and the ETA."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._first_step = 0
        self._first_tokens = 0
        self._tokens = 0

    def tokens(self, count: int) -> None:
        """trl's running count of real tokens trained on."""
        self._tokens = count

    def message(self, step: int, total: int, loss: float | None, now: float | None = None) -> str:
        """`loss 2.412, 312 tokens/s, ETA 41s` (what is known so far)."""
        now = time.monotonic() if now is None else now
        if self._started is None:
            # Rates are measured from the first reported step (a resumed run starts past step 0).
            self._started, self._first_step, self._first_tokens = now, step, self._tokens
            return f"loss {loss:.3f}" if loss is not None else ""
        elapsed = now - self._started
        parts = [f"loss {loss:.3f}"] if loss is not None else []
        if elapsed > 0 and self._tokens > self._first_tokens:
            parts.append(f"{(self._tokens - self._first_tokens) / elapsed:.0f} tokens/s")
        if elapsed > 0 and step > self._first_step:
            parts.append(f"ETA {elapsed / (step - self._first_step) * max(total - step, 0):.0f}s")
        return ", ".join(parts)


class TrainingTask:
    """Fine-tunes an adapter for an iteration (resuming from its checkpoint), or re-emits the one already stored."""

    def __init__(self, settings: TrainerSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store

    async def __call__(self, event: DatasetReady, ctx: TaskContext) -> list[Event]:
        """Handle dataset.ready."""
        if event.budget_exhausted:
            ctx.log.info("dataset ends the migration on its dollar cap; nothing to train")
            return []
        outputs = StageOutputs(self.store, event.migration_id, event.iteration, "adapter")
        done = await outputs.completed("training.json", RESULT_MEDIA_TYPE)
        adapter = await outputs.head("adapter.tar", TAR_MEDIA_TYPE)
        if done is not None and adapter is not None:
            ctx.log.info("adapter already trained; re-emitting")
            return [self._trained(event, adapter, done)]
        report = ctx.progress_reporter("training")
        meter = TrainingMeter()

        def on_step(step: int, total: int, loss: float | None) -> None:
            report(step, total, meter.message(step, total, loss))

        await ctx.progress("training", 0, None, "loading data and model")
        try:
            trained, summary = await asyncio.to_thread(self._train, event, outputs, on_step, meter.tokens, ctx)
        except TrainingError as exc:
            raise TaskError(exc.reason, str(exc)) from exc
        return [self._trained(event, trained, summary)]

    # -- the run ---------------------------------------------------------------------------------------------------

    def _train(
        self,
        event: DatasetReady,
        outputs: StageOutputs,
        on_step: StepCallback,
        on_tokens: Callable[[int], None],
        ctx: TaskContext,
    ) -> tuple[ArtifactRef, dict[str, Any]]:
        manifest = read_manifest(self.store, event.dataset)
        rows = read_training_rows(self.store, manifest)
        try:
            base = resolve_base_model(event.spec.base_model.id, self.settings.model_cache)
        except (FileNotFoundError, ValueError) as exc:
            raise TaskError("base_model_not_found", str(exc)) from exc
        work = self.settings.work_dir / "trainer" / f"{event.migration_id}-{event.iteration}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            previous = self._previous_adapter(event, work)
            run = self._run_id(event, previous)
            checkpoints = CheckpointStore(self.store, event.migration_id, event.iteration, run, work / "upload")
            stored = checkpoints.latest()
            resume_from, resumed_step = stored if stored is not None else (None, None)
            if resume_from is not None:
                ctx.log.info("resuming training from a stored checkpoint", extra={"step": resumed_step})
            training = event.spec.training
            processes = training.num_processes or self.settings.trainer_num_processes
            started = time.time()
            if processes > 1:
                ctx.log.info("training in data parallel", extra={"processes": processes})
                (work / "rows.jsonl").write_bytes(dump_jsonl(rows))
                job = Job(
                    base_model=str(base),
                    rows=str(work / "rows.jsonl"),
                    out_dir=str(work / "adapter"),
                    lora=event.spec.lora,
                    training=training,
                    device=self.settings.device,
                    checkpoint_dir=str(work / "checkpoints"),
                    resume_from=str(resume_from) if resume_from is not None else None,
                    init_adapter=str(previous[1]) if previous is not None else None,
                    migration_id=event.migration_id,
                    iteration=event.iteration,
                    run=run,
                    store_url=self.settings.store_url,
                )
                result = run_data_parallel(
                    job, work / "launch", processes=processes, launcher=self.settings.trainer_launcher, on_step=on_step
                )
            else:
                result = train_adapter(
                    base,
                    rows,
                    work / "adapter",
                    lora=event.spec.lora,
                    training=training,
                    device=self.settings.device,
                    on_step=on_step,
                    on_tokens=on_tokens,
                    checkpoint_dir=work / "checkpoints",
                    on_checkpoint=checkpoints.save if training.checkpoint_steps > 0 else None,
                    resume_from=resume_from,
                    init_adapter=previous[1] if previous is not None else None,
                )
            adapter_manifest = self._manifest(event, base, manifest, rows=len(rows), result=result, previous=previous)
            adapter_manifest["resumed_from_step"] = resumed_step
            adapter_manifest["wall_seconds"] = round(time.time() - started, 3)
            manifest_bytes = json.dumps(adapter_manifest, indent=1, default=str).encode()
            (work / "adapter" / MANIFEST_FILE).write_bytes(manifest_bytes)
            adapter = self.store.put_file(
                outputs.key("adapter.tar"), pack_dir(work / "adapter", work / "adapter.tar"), TAR_MEDIA_TYPE
            )
            self.store.put_bytes(outputs.key("manifest.json"), manifest_bytes, MANIFEST_MEDIA_TYPE)
            merged = None
            if event.spec.training.export_merged:
                merged_dir = merge_adapter(base, work / "adapter", work / "merged", self.settings.device)
                merged = self.store.put_file(
                    outputs.key("merged.tar"), pack_dir(merged_dir, work / "merged.tar"), TAR_MEDIA_TYPE
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        summary: dict[str, Any] = {
            "base_model": event.spec.base_model.id,
            "dataset": event.dataset.model_dump(),
            "rows": len(rows),
            "steps": result.steps,
            "train_loss": _finite(result.train_loss),
            "eval_loss": _finite(result.eval_loss),
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "seconds": result.seconds,
            "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second,
            "peak_memory_bytes": result.peak_memory_bytes,
            "precision": result.precision,
            "lora": event.spec.lora.model_dump(),
            "training": event.spec.training.model_dump(),
            "log_history": result.log_history,
            "resumed_from_step": resumed_step,
            "manifest": outputs.key("manifest.json"),
            "merged": merged.model_dump() if merged is not None else None,
        }
        # Written last: its presence means the whole output exists.
        self.store.put_bytes(
            outputs.key("training.json"), json.dumps(summary, indent=1, default=str).encode(), RESULT_MEDIA_TYPE
        )
        return adapter, summary

    # -- where the run starts ----------------------------------------------------------------------------------------

    def _previous_adapter(self, event: DatasetReady, work: Path) -> tuple[ArtifactRef, Path] | None:
        """The previous iteration's adapter, unpacked, when the spec continues from it."""
        if event.spec.training.init_from != "previous_adapter" or event.iteration == 0:
            return None
        key = artifact_key(event.migration_id, event.iteration - 1, "adapter", "adapter.tar")
        ref = self.store.head(key, TAR_MEDIA_TYPE)
        if ref is None:
            raise TaskError(
                "previous_adapter_missing",
                f"training.init_from=previous_adapter, but iteration {event.iteration - 1} has no adapter at "
                f"{self.store.uri_for(key)}",
            )
        archive = self.store.download(ref, work / "previous.tar")
        return ref, unpack_dir(archive, work / "previous")

    @staticmethod
    def _run_id(event: DatasetReady, previous: tuple[ArtifactRef, Path] | None) -> str:
        """What a checkpoint belongs to: a checkpoint of another run (a changed spec, say) is not resumed."""
        return run_id(
            {
                "dataset": event.dataset.sha256,
                "base_model": event.spec.base_model.model_dump(),
                "lora": event.spec.lora.model_dump(),
                "training": event.spec.training.model_dump(),
                "previous": previous[0].sha256 if previous is not None else None,
            }
        )

    # -- what it made ------------------------------------------------------------------------------------------------

    def _manifest(
        self,
        event: DatasetReady,
        base: Path | str,
        dataset: DatasetManifest,
        *,
        rows: int,
        result: TrainResult,
        previous: tuple[ArtifactRef, Path] | None,
    ) -> dict[str, Any]:
        """Everything the adapter came from and what training measured (adapter_manifest.json)."""
        return {
            "schema_version": 1,
            "migration_id": event.migration_id,
            "iteration": event.iteration,
            "base_model": {**base_model_fingerprint(base), "revision": event.spec.base_model.revision},
            "dataset": {
                "manifest": event.dataset.model_dump(),
                "rows": rows,
                "shards": [
                    {"uri": s.ref.uri, "sha256": s.ref.sha256, "rows": s.rows, "origin": s.origin}
                    for s in dataset.shards
                ],
                "validation_rows": result.validation_rows,
                "train_rows": result.train_rows,
            },
            "test_split": {"uri": event.test.uri, "sha256": event.test.sha256, "used_for_training": False},
            "init_from": event.spec.training.init_from,
            "previous_adapter": previous[0].model_dump() if previous is not None else None,
            "lora": event.spec.lora.model_dump(),
            "training": event.spec.training.model_dump(),
            "precision": result.precision,
            "packing": result.packing,
            "steps": result.steps,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "train_loss": _finite(result.train_loss),
            "eval_loss": _finite(result.eval_loss),
            "loss_curve": [[step, loss] for step, loss in result.loss_history],
            "eval_curve": [[step, loss] for step, loss in result.eval_history],
            "seconds": result.seconds,
            "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second,
            "peak_memory_bytes": result.peak_memory_bytes,
            "library_versions": result.library_versions,
            "device": self.settings.device,
        }

    @staticmethod
    def _trained(event: DatasetReady, adapter: ArtifactRef, summary: dict[str, Any]) -> ModelTrained:
        loss = summary.get("train_loss")
        return ModelTrained(
            migration_id=event.migration_id,
            iteration=event.iteration,
            spec=event.spec,
            adapter=adapter,
            dataset=event.dataset,
            test=event.test,
            train_loss=float(loss) if isinstance(loss, int | float) else None,
            steps=int(summary.get("steps", 0)),
            train_seconds=float(summary.get("seconds", 0.0)),
        )
