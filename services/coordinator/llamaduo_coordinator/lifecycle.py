"""The coordinator's handlers: one migration's life from request to graduated, failed or cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llamaduo.bus import StateStore, TaskContext, TaskError
from llamaduo.contract import (
    ArtifactRef,
    DatasetReady,
    EvaluationCompleted,
    Event,
    MigrationCancel,
    MigrationFailed,
    MigrationGraduated,
    MigrationRequested,
    MigrationResume,
    MigrationSpec,
    NeedMoreData,
    TaskFailed,
)
from llamaduo.data import JSONL_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, DatasetError, DatasetManifest, Shard, dump_jsonl
from llamaduo.report.lineage import write_lineage
from llamaduo.state import IterationRecord, MigrationState, utcnow
from llamaduo.store import ArtifactError, ArtifactStore, artifact_key
from llamaduo.telemetry import ContextLogger
from llamaduo_coordinator.coverage import read_coverage, split_coverage
from llamaduo_coordinator.decisions import Verdict, decide, past_deadline


class Logs(Protocol):
    """Anything with a `log` (a task context, or the coordinator's own for its sweeps)."""

    log: ContextLogger


class EvaluationTooEarly(Exception):
    """An evaluation arrived before its iteration's dataset was recorded; retried later."""


def _failed_event(state: MigrationState) -> MigrationFailed:
    best = state.best()
    return MigrationFailed(
        migration_id=state.migration_id,
        iteration=state.iteration,
        reason=state.failure_reason or "failed",
        detail=state.failure_detail or "",
        best_adapter=best.adapter if best else None,
        best_scores=best.scores if best else None,
        spend=state.spend,
        resumed=state.spec.resumed,
    )


class Coordinator:
    """Owns migration state; every handler is idempotent under redelivery and duplicates."""

    def __init__(self, store: ArtifactStore, coverage_dirs: Sequence[Path] = ()) -> None:
        self.store = store
        self.coverage_dirs = tuple(coverage_dirs)

    # migration.requested ------------------------------------------------------------------------------
    async def on_requested(self, event: MigrationRequested, ctx: TaskContext) -> list[Event]:
        """Validate and split the coverage dataset, then start iteration 0."""
        states = await ctx.states()
        spec = event.spec.model_copy(update={"migration_id": event.migration_id})
        if not await states.create(MigrationState(migration_id=event.migration_id, spec=spec)):
            found = await states.get(event.migration_id)
            if found is None or found[0].status != "accepted":
                ctx.log.info("duplicate migration request ignored")
                return []
            ctx.log.info("resuming a request accepted before a restart")
        try:
            train_ref, test_ref, manifest_ref, manifest, test_rows = await asyncio.to_thread(
                self._prepare, event.migration_id, spec
            )
        except (DatasetError, ArtifactError) as exc:
            reason = "invalid_dataset" if isinstance(exc, DatasetError) else exc.reason
            return await self._fail(states, event.migration_id, reason, str(exc), ctx)

        def start(state: MigrationState) -> MigrationState | None:
            if state.status != "accepted":
                return None
            state.status = "running"
            state.train, state.test = train_ref, test_ref
            state.iterations = [
                IterationRecord(iteration=0, dataset=manifest_ref, train_rows=manifest.rows, synthetic_rows=0)
            ]
            return state

        state = await states.update(event.migration_id, start)
        if state is None or state.status != "running" or state.iteration != 0:
            return []
        ctx.log.info("migration started", extra={"train_rows": manifest.rows, "test_rows": test_rows})
        return [
            DatasetReady(
                migration_id=event.migration_id,
                iteration=0,
                spec=spec,
                dataset=manifest_ref,
                test=test_ref,
                train_rows=manifest.rows,
                synthetic_rows=0,
            )
        ]

    def _prepare(
        self, migration_id: str, spec: MigrationSpec
    ) -> tuple[ArtifactRef, ArtifactRef, ArtifactRef, DatasetManifest, int]:
        rows = read_coverage(self.store, spec.coverage, self.coverage_dirs)
        train, test = split_coverage(rows, spec.coverage)
        put = self.store.put_bytes
        coverage_key = artifact_key(migration_id, None, "coverage", "{}.jsonl").format
        train_ref = put(coverage_key("train"), dump_jsonl(train), JSONL_MEDIA_TYPE)
        test_ref = put(coverage_key("test"), dump_jsonl(test), JSONL_MEDIA_TYPE)
        manifest = DatasetManifest(
            migration_id=migration_id, iteration=0, shards=[Shard(ref=train_ref, rows=len(train), origin="coverage")]
        )
        manifest_ref = put(
            artifact_key(migration_id, 0, "dataset", "manifest.json"),
            manifest.model_dump_json(indent=1).encode(),
            MANIFEST_MEDIA_TYPE,
        )
        return train_ref, test_ref, manifest_ref, manifest, len(test)

    # dataset.ready ------------------------------------------------------------------------------------
    async def on_dataset(self, event: DatasetReady, ctx: TaskContext) -> list[Event]:
        """Record a synthesized iteration's dataset and what its synthesis cost."""
        if event.iteration == 0:
            return []
        states = await ctx.states()

        def record(state: MigrationState) -> MigrationState | None:
            if state.terminal or state.record(event.iteration) is not None:
                return None
            state.iterations.append(
                IterationRecord(
                    iteration=event.iteration,
                    dataset=event.dataset,
                    train_rows=event.train_rows,
                    synthetic_rows=event.synthetic_rows,
                    removed=event.removed,
                    spend=event.spend,
                )
            )
            state.iteration = max(state.iteration, event.iteration)
            state.spend = state.spend + event.spend
            return state

        await states.update(event.migration_id, record)
        if event.budget_exhausted:
            detail = (
                f"synthesis for iteration {event.iteration} stopped before its calls could pass "
                f"budgets.max_cost_usd={event.spec.budgets.max_cost_usd}"
            )
            return await self._fail(states, event.migration_id, "budget:cost", detail, ctx)
        return []

    # evaluation.completed -----------------------------------------------------------------------------
    async def on_evaluated(self, event: EvaluationCompleted, ctx: TaskContext) -> list[Event]:
        """Compare the scores with the thresholds and budgets; emit the decision exactly once."""
        states = await ctx.states()
        found = await states.get(event.migration_id)
        if found is None:
            raise TaskError("unknown_migration", f"evaluation for unknown migration {event.migration_id}")
        current = found[0]
        recorded = current.record(event.iteration)
        unpublished = recorded is not None and recorded.decision is not None and not recorded.decision_published
        if current.terminal and not unpublished:
            return []
        if recorded is None:
            raise EvaluationTooEarly(f"iteration {event.iteration} has no dataset record yet")

        def apply(state: MigrationState) -> MigrationState | None:
            record = state.record(event.iteration)
            if state.terminal or record is None or record.decision is not None:
                return None
            # A resumed migration re-decides an evaluation it recorded before: its spend is in the ledger already.
            if record.judgments is None:
                record.spend = record.spend + event.spend
                state.spend = state.spend + event.spend
            record.adapter, record.judgments, record.scores = event.adapter, event.judgments, event.scores
            record.failed_judgments = event.failed_judgments
            verdict = self._verdict(state, event, record)
            record.decision = verdict.action
            if verdict.action == "graduated":
                state.status = "graduated"
            elif verdict.action == "failed":
                state.status, state.failure_reason, state.failure_detail = "failed", verdict.reason, verdict.detail
            ctx.log.info(
                "iteration evaluated",
                extra={
                    "decision": verdict.action,
                    "detail": verdict.detail,
                    "scores": {k: round(v.mean, 2) for k, v in event.scores.items()},
                },
            )
            return state

        state = await states.update(event.migration_id, apply) or current
        record = state.record(event.iteration)
        if record is None or record.decision is None or state.iteration != event.iteration:
            return []
        if record.decision_published:
            # Redelivered after the decision went out (possibly past JetStream's dedup window): publishing it again
            # would start the next stage a second time.
            ctx.log.info(
                "decision already published; redelivered evaluation ignored", extra={"decision": record.decision}
            )
            return []
        await self._write_lineage(state, event.iteration, ctx)
        for output in self._decision_events(state, event, record):
            await ctx.publisher.publish(output)
        await states.update(event.migration_id, _mark_published(event.iteration))
        return []

    def _decision_events(
        self, state: MigrationState, event: EvaluationCompleted, record: IterationRecord
    ) -> list[Event]:
        """The event that carries the decision recorded for `event`'s iteration."""
        if record.decision == "graduated":
            return [
                MigrationGraduated(
                    migration_id=state.migration_id,
                    iteration=event.iteration,
                    adapter=event.adapter,
                    base_model=state.spec.base_model.id,
                    scores=event.scores,
                    thresholds=state.spec.evaluation.thresholds,
                    spend=state.spend,
                )
            ]
        if record.decision == "failed":
            return [_failed_event(state)]
        round_index = event.iteration
        new_rows = self._verdict(state, event, record).new_rows
        return [
            NeedMoreData(
                migration_id=state.migration_id,
                iteration=event.iteration,
                spec=state.spec,
                dataset=event.dataset,
                test=event.test,
                judgments=event.judgments,
                new_rows=max(new_rows, 1),
                round_index=round_index,
            )
        ]

    async def _write_lineage(self, state: MigrationState, iteration: int, ctx: TaskContext) -> None:
        """Store what the iteration's adapter came from (the same bytes on a redelivery); never fails a decision."""
        try:
            await asyncio.to_thread(write_lineage, self.store, state, iteration)
        except (ArtifactError, OSError, ValueError) as exc:
            ctx.log.warning("lineage not written", extra={"error": repr(exc)})

    @staticmethod
    def _verdict(state: MigrationState, event: EvaluationCompleted, record: IterationRecord) -> Verdict:
        if event.budget_exhausted:
            return Verdict(
                "failed",
                "budget:cost",
                f"judging of iteration {event.iteration} stopped before its calls could pass "
                f"budgets.max_cost_usd={state.spec.budgets.max_cost_usd}; spent ${state.spend.usd:.4f}",
            )
        earlier = [item.scores for item in state.iterations if item.iteration < event.iteration and item.scores]
        return decide(
            state.spec,
            event.iteration,
            event.scores,
            state.spend,
            record.synthetic_rows,
            earlier=earlier,
            started=state.clock_started,
            now=utcnow(),
        )

    # task.failed and migration.cancel -----------------------------------------------------------------
    async def on_task_failed(self, event: TaskFailed, ctx: TaskContext) -> list[Event]:
        """A worker gave up: the migration fails with the worker's reason."""
        # A budget a worker enforced is the migration's reason as such (budget:cost), not a worker fault.
        reason = event.reason if event.reason.startswith("budget:") else f"task_failed:{event.service}:{event.reason}"
        return await self._fail(await ctx.states(), event.migration_id, reason, event.detail, ctx)

    async def on_cancel(self, event: MigrationCancel, ctx: TaskContext) -> list[Event]:
        """Stop the migration; workers skip its pending tasks."""
        return await self._fail(await ctx.states(), event.migration_id, "cancelled", event.reason, ctx, "cancelled")

    async def _fail(
        self, states: StateStore, migration_id: str, reason: str, detail: str, ctx: Logs, status: str = "failed"
    ) -> list[Event]:
        def mark(state: MigrationState) -> MigrationState | None:
            if state.terminal:
                return None
            state.status = "cancelled" if status == "cancelled" else "failed"
            state.failure_reason, state.failure_detail = reason, detail
            return state

        before = await states.get(migration_id)
        if before is None:
            ctx.log.warning("failure for unknown migration ignored", extra={"reason": reason})
            return []
        if before[0].terminal:
            return [_failed_event(before[0])] if before[0].failure_reason == reason else []
        state = await states.update(migration_id, mark)
        if state is None:
            return []
        ctx.log.warning("migration failed", extra={"reason": reason, "detail": detail})
        return [_failed_event(state)]

    # deadlines --------------------------------------------------------------------------------------------
    async def expire_deadlines(self, states: StateStore, log: ContextLogger) -> list[Event]:
        """Fail every running migration whose wall-clock deadline has passed (called periodically)."""
        now = utcnow()
        events: list[Event] = []
        for state in await states.list():
            if state.terminal or not past_deadline(state.spec, state.clock_started, now):
                continue
            minutes = state.spec.budgets.deadline_minutes
            detail = f"the deadline of {minutes:g} minutes passed during iteration {state.iteration}"
            events += await self._fail(states, state.migration_id, "deadline", detail, _Sweep(log))
        return events

    # migration.resume -------------------------------------------------------------------------------------
    async def on_resume(self, event: MigrationResume, ctx: TaskContext) -> list[Event]:
        """Reopen a failed or cancelled migration and restart its last unfinished stage.

        The stage's input event is published again (with the resume count in its id); every stage whose output is
        stored re-emits it without redoing the work, so the migration continues where it stopped. An evaluation
        that was decided `failed` (a budget, the plateau) is decided again under the new budgets.
        """
        states = await ctx.states()
        found = await states.get(event.migration_id)
        if found is None:
            raise TaskError("unknown_migration", f"cannot resume unknown migration {event.migration_id}")
        if found[0].status not in ("failed", "cancelled"):
            ctx.log.info("resume ignored", extra={"status": found[0].status})
            return []
        if found[0].train is None or found[0].test is None or not found[0].iterations:
            ctx.log.warning("resume ignored: the migration never started", extra={"reason": found[0].failure_reason})
            return []

        def reopen(state: MigrationState) -> MigrationState | None:
            if state.status not in ("failed", "cancelled"):
                return None
            state.spec = state.spec.model_copy(
                update={"resumed": state.spec.resumed + 1, "budgets": event.budgets or state.spec.budgets}
            )
            state.status, state.failure_reason, state.failure_detail = "running", None, None
            state.resumed_at = utcnow()
            last = state.iterations[-1]
            if last.decision == "failed":
                last.decision, last.decision_published = None, False
            return state

        state = await states.update(event.migration_id, reopen)
        if state is None:
            return []
        last = state.iterations[-1]
        assert state.test is not None
        ctx.log.info(
            "migration resumed",
            extra={"resumed": state.spec.resumed, "from_iteration": last.iteration, "decision": last.decision},
        )
        if last.decision == "need_more_data" and last.judgments is not None:
            return [
                NeedMoreData(
                    migration_id=state.migration_id,
                    iteration=last.iteration,
                    spec=state.spec,
                    dataset=last.dataset,
                    test=state.test,
                    judgments=last.judgments,
                    new_rows=max(_rows_to_ask(state, last), 1),
                    round_index=last.iteration,
                )
            ]
        return [
            DatasetReady(
                migration_id=state.migration_id,
                iteration=last.iteration,
                spec=state.spec,
                dataset=last.dataset,
                test=state.test,
                train_rows=last.train_rows,
                synthetic_rows=last.synthetic_rows,
                removed=last.removed,
            )
        ]


def _rows_to_ask(state: MigrationState, record: IterationRecord) -> int:
    """The synthesis volume of the round after `record`, within the synthetic-rows budget."""
    rows = state.spec.rows_for_round(record.iteration)
    cap = state.spec.budgets.max_synthetic_rows
    return rows if cap is None else min(rows, cap - record.synthetic_rows)


def _mark_published(iteration: int) -> Callable[[MigrationState], MigrationState | None]:
    """A state update recording that the decision of `iteration` was accepted by JetStream."""

    def mark(state: MigrationState) -> MigrationState | None:
        record = state.record(iteration)
        if record is None or record.decision_published:
            return None
        record.decision_published = True
        return state

    return mark


@dataclass
class _Sweep:
    """The coordinator's own context for work no event started (deadline sweeps)."""

    log: ContextLogger
