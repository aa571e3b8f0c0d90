"""One synthesis round: need_more_data for iteration n in, dataset of iteration n+1 out (idempotent by key).

Kept rows are streamed to part files under `iter-NNNN/dataset/`, each committed by a small record written after it
(`synthetic-part-NNNNN.jsonl`, then `synthetic-part-NNNNN.json` holding its shard and the round's checkpoint). A
redelivered task indexes the committed parts and continues after the last one; the manifest, then the summary, are
written last, and a task whose summary exists only re-emits its event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import ArtifactRef, DatasetReady, Event, NeedMoreData, Spend
from llamaduo.data import (
    JSONL_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    ChatRow,
    DatasetError,
    DatasetManifest,
    Shard,
    dump_jsonl,
    read_manifest,
    read_rows,
)
from llamaduo.data.results import Judgment, load_models
from llamaduo.llm import ServiceLLM, resolve
from llamaduo.store import ArtifactError, ArtifactStore, artifact_key
from llamaduo_synthesizer.prompts import TemplateError, validate_template
from llamaduo_synthesizer.settings import SynthesizerSettings
from llamaduo_synthesizer.synthesis import MAX_WAVE, PART_ROWS, Checkpoint, PairScreen, synthesize
from llamaduo_synthesizer.targeting import Targeting, build_targeting

SUMMARY_MEDIA_TYPE = "application/vnd.llamaduo.synthesis+json"
PART_MEDIA_TYPE = "application/vnd.llamaduo.synthesis-part+json"


class PartRecord(BaseModel):
    """The commit record of one stored part: its shard, and the round's checkpoint once the part is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str = Field(description="The round this part belongs to (inputs and settings that shape its rows).")
    part: int = Field(ge=0)
    shard: Shard
    checkpoint: Checkpoint


def part_keys(migration_id: str, iteration: int, part: int) -> tuple[str, str]:
    """Keys of a part's rows (JSONL) and of its commit record."""
    stem = f"synthetic-part-{part:05d}"
    return (
        artifact_key(migration_id, iteration, "dataset", f"{stem}.jsonl"),
        artifact_key(migration_id, iteration, "dataset", f"{stem}.json"),
    )


class SynthesisTask:
    """Grows the training set with service-LLM pairs like the train seeds, never like the test split."""

    def __init__(
        self,
        settings: SynthesizerSettings,
        store: ArtifactStore,
        *,
        part_rows: int = PART_ROWS,
        max_wave: int = MAX_WAVE,
    ) -> None:
        self.settings = settings
        self.store = store
        self.part_rows = part_rows
        self.max_wave = max_wave

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
                budget_exhausted=bool(summary.get("budget_exhausted", False)),
            )
        ]

    def _fingerprint(self, event: NeedMoreData, model: str) -> str:
        """What shapes this round's rows: a stored part of another round (a changed spec, say) is not resumed."""
        synthesis = event.spec.synthesis
        material = {
            "round": event.round_index,
            "new_rows": event.new_rows,
            "synthesis": synthesis.model_dump(mode="json"),
            "task": event.spec.task.model_dump(mode="json"),
            "seed": event.spec.coverage.split_seed,
            "dataset": event.dataset.sha256,
            "test": event.test.sha256,
            # Targeting reads the judgments, and quotes only samples below the graduation bar.
            "judgments": event.judgments.sha256 if synthesis.targeted else None,
            "thresholds": event.spec.evaluation.thresholds if synthesis.targeted else None,
            "model": model,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    async def _stored_parts(self, event: NeedMoreData, fingerprint: str, ctx: TaskContext) -> list[PartRecord]:
        """The committed parts of this round, in order, up to the first missing or foreign one."""
        records: list[PartRecord] = []
        while True:
            _, record_key = part_keys(event.migration_id, event.iteration + 1, len(records))
            ref = await asyncio.to_thread(self.store.head, record_key, PART_MEDIA_TYPE)
            if ref is None:
                return records
            try:
                record = PartRecord.model_validate_json(await asyncio.to_thread(self.store.read_bytes, ref))
            except ValueError as exc:
                ctx.log.warning("unreadable part record; redoing from it", extra={"key": record_key, "error": str(exc)})
                return records
            if record.fingerprint != fingerprint or record.part != len(records):
                # Left by a round with other inputs: everything from here is redone (and overwritten).
                ctx.log.warning("part record of another round; redoing from it", extra={"key": record_key})
                return records
            records.append(record)

    async def _targeting(
        self, event: NeedMoreData, test_rows: list[ChatRow], seeds: list[ChatRow], screen: PairScreen
    ) -> Targeting:
        data = await asyncio.to_thread(self.store.read_bytes, event.judgments)
        judgments = load_models(data, Judgment, event.judgments.uri)
        categories = {row.category for row in seeds}
        # A sample is a failure worth quoting when it misses the strictest graduation bar.
        passing = max(event.spec.evaluation.thresholds.values())
        return await asyncio.to_thread(
            lambda: build_targeting(judgments, test_rows, categories, screen.guard, passing=passing)
        )

    async def _synthesize(
        self, event: NeedMoreData, manifest_key: str, summary_key: str, ctx: TaskContext
    ) -> ArtifactRef:
        target = event.iteration + 1
        synthesis = event.spec.synthesis
        if synthesis.prompt_template is not None:
            try:
                validate_template(synthesis.prompt_template)
            except TemplateError as exc:
                raise TaskError("invalid_prompt_template", str(exc)) from exc
        previous = await asyncio.to_thread(read_manifest, self.store, event.dataset)
        test_rows = await asyncio.to_thread(read_rows, self.store, event.test)
        screen = await asyncio.to_thread(PairScreen.for_spec, test_rows, synthesis)
        seeds: list[ChatRow] = []
        # One shard at a time: a large training set is indexed for dedup without all of it in memory at once.
        for shard in previous.shards:
            rows = await asyncio.to_thread(read_rows, self.store, shard.ref)
            if shard.origin == "coverage":
                seeds.extend(rows)
            await asyncio.to_thread(screen.index_existing, rows)
        targeting = await self._targeting(event, test_rows, seeds, screen) if synthesis.targeted else None
        resolved = resolve(self.settings.service_llm, synthesis.generator)
        fingerprint = self._fingerprint(event, resolved.model)
        records: list[PartRecord] = []
        for record in await self._stored_parts(event, fingerprint, ctx):
            try:
                rows = await asyncio.to_thread(read_rows, self.store, record.shard.ref)
            except (ArtifactError, DatasetError) as exc:
                # Our own intermediate output, damaged or gone: redo the round from the part before it.
                ctx.log.warning(
                    "stored part unreadable; redoing from it", extra={"part": record.part, "error": str(exc)}
                )
                break
            await asyncio.to_thread(screen.index_existing, rows)
            records.append(record)
        shards = [record.shard for record in records]
        resume = records[-1].checkpoint if records else None
        if resume is not None:
            ctx.log.info("resuming synthesis", extra={"parts": len(records), "kept": resume.kept})

        async def store_part(rows: list[ChatRow], checkpoint: Checkpoint) -> None:
            rows_key, record_key = part_keys(event.migration_id, target, len(shards))
            ref = await asyncio.to_thread(self.store.put_bytes, rows_key, dump_jsonl(rows), JSONL_MEDIA_TYPE)
            shard = Shard(ref=ref, rows=len(rows), origin="synthetic", round_index=event.round_index)
            record = PartRecord(fingerprint=fingerprint, part=len(shards), shard=shard, checkpoint=checkpoint)
            # The record goes after the rows: its presence is what commits the part for a resumed task.
            await asyncio.to_thread(
                self.store.put_bytes, record_key, record.model_dump_json().encode(), PART_MEDIA_TYPE
            )
            shards.append(shard)

        cap = await ctx.spend_cap(event.spec.budgets.max_cost_usd)
        if cap is not None and resume is not None:
            cap.spent_usd += resume.spend.usd  # parts stored by an earlier delivery are paid, not yet in the ledger
        llm = ServiceLLM(resolved, self.store, spend_cap=cap)
        try:
            outcome = await synthesize(
                seeds,
                llm,
                screen,
                synthesis=synthesis,
                task=event.spec.task,
                new_rows=event.new_rows,
                cache_scope=event.migration_id,
                round_index=event.round_index,
                seed=event.spec.coverage.split_seed,
                targeting=targeting,
                resume=resume,
                sink=store_part,
                part_rows=self.part_rows,
                max_wave=self.max_wave,
                on_progress=ctx.progress_reporter("synthesis"),
            )
        except TemplateError as exc:
            raise TaskError("invalid_prompt_template", str(exc)) from exc
        except ValueError as exc:  # no usable seed: every train row repeats or overlaps the test split
            raise TaskError("no_usable_seeds", str(exc)) from exc
        finally:
            await llm.aclose()
        if outcome.kept == 0 and not outcome.budget_exhausted:
            raise TaskError(
                "no_synthetic_rows",
                f"{outcome.calls} service-LLM calls produced no usable row (removed: {outcome.removed}, "
                f"prompts withheld for carrying test text: {outcome.withheld})",
            )
        manifest = DatasetManifest(
            migration_id=event.migration_id, iteration=target, shards=[*previous.shards, *shards]
        )
        manifest_ref = await asyncio.to_thread(
            self.store.put_bytes, manifest_key, manifest.model_dump_json(indent=1).encode(), MANIFEST_MEDIA_TYPE
        )
        summary = {
            "kept": outcome.kept,
            "asked": event.new_rows,
            "calls": outcome.calls,
            "failed_calls": outcome.failed_calls,
            "withheld_prompts": outcome.withheld,
            "seeds_excluded": outcome.seeds_excluded,
            "parts": len(shards),
            "resumed_parts": len(records),
            "removed": outcome.removed,
            "spend": outcome.spend.model_dump(),
            "targeting": targeting.summary() if targeting is not None else None,
            "budget_exhausted": outcome.budget_exhausted,
        }
        # Written last: its presence means the whole output exists.
        await asyncio.to_thread(
            self.store.put_bytes, summary_key, json.dumps(summary, indent=1).encode(), SUMMARY_MEDIA_TYPE
        )
        ctx.log.info(
            "synthesized",
            extra={
                "kept": outcome.kept,
                "parts": len(shards),
                "removed": outcome.removed,
                "withheld": outcome.withheld,
            },
        )
        return manifest_ref
