"""One training task: dataset.ready in, adapter artifact and model.trained out (idempotent by key)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Callable

from llamaduo.bus import TaskContext
from llamaduo.contract import ArtifactRef, DatasetReady, Event, ModelTrained
from llamaduo.data import read_manifest, read_training_rows
from llamaduo.localmodel import resolve_base_model
from llamaduo.store import ArtifactStore
from llamaduo.store.archive import TAR_MEDIA_TYPE, pack_dir
from llamaduo.store.outputs import StageOutputs
from llamaduo_trainer.finetune import TrainResult, train_adapter
from llamaduo_trainer.settings import TrainerSettings

RESULT_MEDIA_TYPE = "application/vnd.llamaduo.training-result+json"


class TrainingTask:
    """Fine-tunes an adapter for an iteration, or re-emits the one already stored for it."""

    def __init__(self, settings: TrainerSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store

    async def __call__(self, event: DatasetReady, ctx: TaskContext) -> list[Event]:
        """Handle dataset.ready."""
        if event.budget_exhausted:
            ctx.log.info("dataset ends the migration on its dollar cap; nothing to train")
            return []
        outputs = StageOutputs(self.store, event.migration_id, event.iteration, "adapter")
        # training.json is written after the adapter, so its presence means the whole output exists.
        done = await outputs.completed("training.json", RESULT_MEDIA_TYPE)
        adapter = await outputs.head("adapter.tar", TAR_MEDIA_TYPE)
        if done is not None and adapter is not None:
            ctx.log.info("adapter already trained; re-emitting")
            return [self._trained(event, adapter, done)]
        report = ctx.progress_reporter("training")

        def on_step(step: int, total: int, loss: float | None) -> None:
            report(step, total)

        await ctx.progress("training", 0, None, "loading data and model")
        trained, summary = await asyncio.to_thread(
            self._train, event, outputs.key("adapter.tar"), outputs.key("training.json"), on_step
        )
        return [self._trained(event, trained, summary)]

    def _train(
        self, event: DatasetReady, adapter_key: str, result_key: str, on_step: Callable[[int, int, float | None], None]
    ) -> tuple[ArtifactRef, dict[str, object]]:
        manifest = read_manifest(self.store, event.dataset)
        rows = read_training_rows(self.store, manifest)
        base = resolve_base_model(event.spec.base_model.id, self.settings.model_cache)
        work = self.settings.work_dir / "trainer" / f"{event.migration_id}-{event.iteration}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            result: TrainResult = train_adapter(
                base,
                rows,
                work / "adapter",
                lora=event.spec.lora,
                training=event.spec.training,
                device=self.settings.device,
                on_step=on_step,
            )
            adapter = self.store.put_file(adapter_key, pack_dir(work / "adapter", work / "adapter.tar"), TAR_MEDIA_TYPE)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        summary: dict[str, object] = {
            "base_model": event.spec.base_model.id,
            "dataset": event.dataset.model_dump(),
            "rows": len(rows),
            "steps": result.steps,
            # NaN (a diverged run) is not JSON: record it as unknown.
            "train_loss": result.train_loss
            if result.train_loss is not None and math.isfinite(result.train_loss)
            else None,
            "seconds": result.seconds,
            "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second,
            "precision": result.precision,
            "lora": event.spec.lora.model_dump(),
            "training": event.spec.training.model_dump(),
            "log_history": result.log_history,
        }
        self.store.put_bytes(result_key, json.dumps(summary, indent=1).encode(), RESULT_MEDIA_TYPE)
        return adapter, summary

    @staticmethod
    def _trained(event: DatasetReady, adapter: ArtifactRef, summary: dict[str, object]) -> ModelTrained:
        loss = summary.get("train_loss")
        return ModelTrained(
            migration_id=event.migration_id,
            iteration=event.iteration,
            spec=event.spec,
            adapter=adapter,
            dataset=event.dataset,
            test=event.test,
            train_loss=float(loss) if isinstance(loss, int | float) else None,
            steps=int(summary.get("steps", 0)),  # type: ignore[call-overload]
            train_seconds=float(summary.get("seconds", 0.0)),  # type: ignore[arg-type]
        )
