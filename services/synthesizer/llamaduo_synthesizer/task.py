"""One synthesis round: need_more_data for iteration n in, dataset of iteration n+1 out (idempotent by key)."""

from __future__ import annotations

import asyncio
import json

from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import ArtifactRef, DatasetReady, Event, NeedMoreData, Spend
from llamaduo.data import (
    JSONL_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    DatasetManifest,
    Shard,
    dump_jsonl,
    read_manifest,
    read_rows,
)
from llamaduo.llm import ServiceLLM, resolve
from llamaduo.store import ArtifactStore, artifact_key
from llamaduo_synthesizer.settings import SynthesizerSettings
from llamaduo_synthesizer.synthesis import synthesize

SUMMARY_MEDIA_TYPE = "application/vnd.llamaduo.synthesis+json"


class SynthesisTask:
    """Grows the training set with service-LLM pairs like the train seeds, never like the test split."""

    def __init__(self, settings: SynthesizerSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store

    async def __call__(self, event: NeedMoreData, ctx: TaskContext) -> list[Event]:
        """Handle migration.need_more_data."""
        target = event.iteration + 1
        manifest_key = artifact_key(event.migration_id, target, "dataset", "manifest.json")
        summary_key = artifact_key(event.migration_id, target, "dataset", "synthesis.json")
        stored = await asyncio.to_thread(self.store.head, summary_key, SUMMARY_MEDIA_TYPE)
        manifest_ref = await asyncio.to_thread(self.store.head, manifest_key, MANIFEST_MEDIA_TYPE)
        if stored is None or manifest_ref is None:
            manifest_ref = await self._synthesize(event, manifest_key, summary_key, ctx)
            stored = await asyncio.to_thread(self.store.head, summary_key, SUMMARY_MEDIA_TYPE)
        else:
            ctx.log.info("dataset already synthesized; re-emitting")
        assert stored is not None
        summary = json.loads(await asyncio.to_thread(self.store.read_bytes, stored))
        manifest = await asyncio.to_thread(read_manifest, self.store, manifest_ref)
        return [
            DatasetReady(
                migration_id=event.migration_id,
                iteration=target,
                spec=event.spec,
                dataset=manifest_ref,
                test=event.test,
                train_rows=manifest.rows,
                synthetic_rows=manifest.synthetic_rows,
                removed=summary["removed"],
                spend=Spend.model_validate(summary["spend"]),
            )
        ]

    async def _synthesize(
        self, event: NeedMoreData, manifest_key: str, summary_key: str, ctx: TaskContext
    ) -> ArtifactRef:
        previous = await asyncio.to_thread(read_manifest, self.store, event.dataset)
        existing = []
        seeds = []
        for shard in previous.shards:
            rows = await asyncio.to_thread(read_rows, self.store, shard.ref)
            existing.extend(rows)
            if shard.origin == "coverage":
                seeds.extend(rows)
        test_rows = await asyncio.to_thread(read_rows, self.store, event.test)
        llm = ServiceLLM(resolve(self.settings.service_llm, event.spec.synthesis.generator), self.store)
        try:
            outcome = await synthesize(
                seeds,
                test_rows,
                existing,
                llm,
                synthesis=event.spec.synthesis,
                task=event.spec.task,
                new_rows=event.new_rows,
                cache_scope=event.migration_id,
                round_index=event.round_index,
                seed=event.spec.coverage.split_seed,
                on_progress=ctx.progress_reporter("synthesis"),
            )
        except ValueError as exc:  # no usable seed: every train row repeats a test row
            raise TaskError("no_usable_seeds", str(exc)) from exc
        finally:
            await llm.aclose()
        if not outcome.rows:
            raise TaskError(
                "no_synthetic_rows",
                f"{outcome.calls} service-LLM calls produced no usable row (removed: {outcome.removed})",
            )
        target = event.iteration + 1
        shard_ref = await asyncio.to_thread(
            self.store.put_bytes,
            artifact_key(event.migration_id, target, "dataset", "synthetic.jsonl"),
            dump_jsonl(outcome.rows),
            JSONL_MEDIA_TYPE,
        )
        manifest = DatasetManifest(
            migration_id=event.migration_id,
            iteration=target,
            shards=[
                *previous.shards,
                Shard(ref=shard_ref, rows=len(outcome.rows), origin="synthetic", round_index=event.round_index),
            ],
        )
        manifest_ref = await asyncio.to_thread(
            self.store.put_bytes, manifest_key, manifest.model_dump_json(indent=1).encode(), MANIFEST_MEDIA_TYPE
        )
        summary = {
            "kept": len(outcome.rows),
            "asked": event.new_rows,
            "calls": outcome.calls,
            "failed_calls": outcome.failed_calls,
            "removed": outcome.removed,
            "spend": outcome.spend.model_dump(),
        }
        # Written last: its presence means the whole output exists.
        await asyncio.to_thread(
            self.store.put_bytes, summary_key, json.dumps(summary, indent=1).encode(), SUMMARY_MEDIA_TYPE
        )
        ctx.log.info("synthesized", extra={"kept": len(outcome.rows), "removed": outcome.removed})
        return manifest_ref
