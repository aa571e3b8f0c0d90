"""Each stop rule driven to its machine-readable reason by the coordinator on the real bus, with the workers'
events published as they would be: plateau, deadline, the dollar cap (from the judge and from the synthesizer),
and resume (a cancelled migration restarts its stage; a plateau-failed one is decided again, spend counted once)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from llamaduo.bus import Publisher, StateStore
from llamaduo.bus.provisioning import STATE_BUCKET
from llamaduo.client import Client
from llamaduo.contract import (
    ArtifactRef,
    DatasetReady,
    EvaluationCompleted,
    MetricSummary,
    MigrationFailed,
    MigrationResume,
    Spend,
)
from llamaduo.contract.spec import BudgetSpec
from llamaduo.embedded.nats_server import NatsServer
from llamaduo.state import MigrationState
from llamaduo_coordinator.settings import CoordinatorSettings
from tests.integration.test_coordinator import chat, coordinator, events_until_quiet, spec_for

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        yield CoordinatorSettings(
            nats_url=server.url,
            store_url=(tmp_path / "store").as_uri(),
            ack_wait_s=5,
            retry_base_delay_s=0.2,
            deadline_check_s=0.3,
        )


@pytest.fixture
def coverage(tmp_path):
    path = tmp_path / "coverage.jsonl"
    path.write_text("\n".join(chat(i) for i in range(20)))
    return path


def scores(mean: float) -> dict[str, MetricSummary]:
    summary = MetricSummary(
        mean=mean, median=mean, share_ge_50=1.0, share_ge_70=0.0, judged=10, ci_low=mean - 2, ci_high=mean + 2
    )
    return {"similarity": summary, "precision": summary}


def adapter_ref(iteration: int) -> ArtifactRef:
    return ArtifactRef(uri=f"file:///adapters/{iteration}.tar", sha256=f"{iteration:064d}", size=10)


def evaluation(ready: DatasetReady, mean: float, **extra: Any) -> EvaluationCompleted:
    return EvaluationCompleted(
        migration_id=ready.migration_id,
        iteration=ready.iteration,
        spec=ready.spec,
        adapter=adapter_ref(ready.iteration),
        dataset=ready.dataset,
        test=ready.test,
        judgments=ready.test,
        scores=scores(mean),
        failed_judgments=0,
        spend=extra.pop("spend", Spend(calls=10, usd=0.10)),
        **extra,
    )


def next_dataset(ready: DatasetReady, **extra: Any) -> DatasetReady:
    """What the synthesizer emits for the next iteration."""
    return ready.model_copy(
        update={"iteration": ready.iteration + 1, "synthetic_rows": 5, "train_rows": ready.train_rows + 5, **extra}
    )


async def everything(client: Client, migration_id: str, since: datetime, quiet_s: float = 2.5) -> list[Any]:
    """Every event of the migration from shortly before `since` until it goes quiet, past terminal events too."""
    out: list[Any] = []
    with contextlib.suppress(TimeoutError):
        async for event in client.follow(migration_id, since, idle_timeout=quiet_s, stop_at_terminal=False):
            out.append(event)
    return out


async def until_status(client: Client, migration_id: str, status: str, timeout_s: float = 20.0) -> None:
    """Wait until the coordinator has recorded `status` (a resume sent before that would be ignored)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (state := await client.status(migration_id)) is None or state.status != status:
        assert asyncio.get_running_loop().time() < deadline, f"{migration_id} never became {status}"
        await asyncio.sleep(0.1)


async def start(client: Client, spec, migration_id: str) -> DatasetReady:
    since = datetime.now(UTC)
    await client.submit(spec, migration_id)
    _, ready = await events_until_quiet(client, migration_id, since, 2)
    assert isinstance(ready, DatasetReady)
    return ready


async def test_a_plateau_ends_the_migration_with_the_best_adapter_so_far(settings, coverage):
    spec = spec_for(coverage, evaluation={"thresholds": {"similarity": 90}}, budgets={"plateau_iterations": 1})
    async with coordinator(settings) as client:
        publisher = Publisher(client.js, "test", settings)
        ready = await start(client, spec, "plateau-mig")
        since = datetime.now(UTC)
        await publisher.publish(evaluation(ready, 50))
        await publisher.publish(next_dataset(ready))
        await publisher.publish(evaluation(next_dataset(ready), 51))  # inside iteration 0's interval: no progress
        events = await events_until_quiet(client, "plateau-mig", since, 10)
        state = await client.status("plateau-mig")
    failed = events[-1]
    assert isinstance(failed, MigrationFailed) and failed.reason == "plateau"
    assert [e.name for e in events].count("migration.need_more_data") == 1
    # The best adapter so far is still published, with its scores.
    assert failed.best_adapter == adapter_ref(1) and failed.best_scores is not None
    assert failed.best_scores["similarity"].mean == 51
    assert state.status == "failed" and state.failure_reason == "plateau"
    assert state.spend.usd == pytest.approx(0.20)


async def test_the_deadline_fails_a_migration_while_no_event_arrives(settings, coverage):
    spec = spec_for(coverage, budgets={"deadline_minutes": 0.01})
    async with coordinator(settings) as client:
        since = datetime.now(UTC)
        await client.submit(spec, "late-mig")
        events = await events_until_quiet(client, "late-mig", since, 3)
        state = await client.status("late-mig")
    assert [(e.name, getattr(e, "reason", None)) for e in events] == [
        ("migration.requested", None),
        ("dataset.ready", None),
        ("migration.failed", "deadline"),
    ]
    assert state.status == "failed" and state.failure_reason == "deadline"
    assert "0.01 minutes passed" in (state.failure_detail or "")


@pytest.mark.parametrize("stage", ["judge", "synthesizer"])
async def test_a_worker_stopped_by_the_dollar_cap_fails_with_budget_cost_and_its_spend_recorded(
    settings, coverage, stage
):
    spec = spec_for(coverage, budgets={"max_cost_usd": 0.5})
    migration_id = f"cap-{stage}"
    async with coordinator(settings) as client:
        publisher = Publisher(client.js, "test", settings)
        ready = await start(client, spec, migration_id)
        since = datetime.now(UTC)
        if stage == "judge":
            await publisher.publish(evaluation(ready, 40, spend=Spend(calls=4, usd=0.49), budget_exhausted=True))
        else:
            await publisher.publish(evaluation(ready, 40, spend=Spend(calls=4, usd=0.30)))
            await publisher.publish(next_dataset(ready, spend=Spend(calls=3, usd=0.19), budget_exhausted=True))
        events = await events_until_quiet(client, migration_id, since, 10)
        state = await client.status(migration_id)
    failed = events[-1]
    assert isinstance(failed, MigrationFailed) and failed.reason == "budget:cost"
    assert state.failure_reason == "budget:cost"
    assert state.spend.usd == pytest.approx(0.49) and failed.spend.usd == pytest.approx(0.49)


async def test_resume_restarts_a_cancelled_stage_and_redecides_a_failed_one_without_double_counting(settings, coverage):
    spec = spec_for(coverage, evaluation={"thresholds": {"similarity": 90}}, budgets={"plateau_iterations": 1})
    async with coordinator(settings) as client:
        publisher = Publisher(client.js, "test", settings)

        # Cancelled while iteration 0 trains: resume publishes its dataset.ready again, under a new id.
        ready = await start(client, spec, "resume-cancel")
        await client.cancel("resume-cancel", "pausing")
        await until_status(client, "resume-cancel", "cancelled")
        since = datetime.now(UTC)
        await publisher.publish(MigrationResume(migration_id="resume-cancel", request_id=uuid.uuid4().hex))
        events = await everything(client, "resume-cancel", since)
        restarted = [e for e in events if isinstance(e, DatasetReady) and e.spec.resumed == 1]
        assert len(restarted) == 1 and restarted[0].iteration == 0
        assert restarted[0].dataset == ready.dataset
        state = await client.status("resume-cancel")
        assert state.status == "running" and state.failure_reason is None

        # Failed on the plateau rule; resumed without it, the same evaluation is decided again.
        ready = await start(client, spec, "resume-plateau")
        await publisher.publish(evaluation(ready, 50))
        await publisher.publish(next_dataset(ready))
        await publisher.publish(evaluation(next_dataset(ready), 51))
        await events_until_quiet(client, "resume-plateau", datetime.now(UTC), 10)
        assert (await client.status("resume-plateau")).failure_reason == "plateau"
        since = datetime.now(UTC)
        budgets = BudgetSpec(max_iterations=4, plateau_iterations=None)
        await publisher.publish(
            MigrationResume(migration_id="resume-plateau", request_id=uuid.uuid4().hex, budgets=budgets)
        )
        resumed_events = await everything(client, "resume-plateau", since)
        again = [e for e in resumed_events if isinstance(e, DatasetReady) and e.spec.resumed == 1]
        assert len(again) == 1 and again[0].iteration == 1
        # The judge finds its stored evaluation and emits it again, under the resumed spec.
        since = datetime.now(UTC)
        await publisher.publish(evaluation(again[0], 51))
        decided = [e for e in await everything(client, "resume-plateau", since) if e.name == "migration.need_more_data"]
        state = await client.status("resume-plateau")
    assert len(decided) == 1 and decided[0].spec.resumed == 1
    assert state.status == "running" and state.spec.budgets.plateau_iterations is None
    assert state.spend.usd == pytest.approx(0.20), "a re-emitted evaluation is not paid twice"


async def test_a_decision_recorded_but_never_published_goes_out_when_the_evaluation_is_redelivered(settings, coverage):
    # The coordinator wrote `graduated` into the state and died before its publish: the state is terminal, yet the
    # redelivered evaluation must still put `migration.graduated` on the stream, once, and record that it did.
    spec = spec_for(coverage, evaluation={"thresholds": {"similarity": 90, "precision": 90}})
    async with coordinator(settings) as client:
        publisher = Publisher(client.js, "test", settings)
        ready = await start(client, spec, "crashed-mig")
        states = StateStore(await client.js.key_value(STATE_BUCKET))

        def crashed_after_state_write(state: MigrationState) -> MigrationState:
            record = state.iterations[0]
            record.adapter, record.scores, record.decision = adapter_ref(0), scores(95), "graduated"
            state.status = "graduated"
            return state

        await states.update("crashed-mig", crashed_after_state_write)
        since = datetime.now(UTC)
        await publisher.publish(evaluation(ready, 95))
        await until_published(client, "crashed-mig")
        await publisher.publish(evaluation(ready, 95), ce_id="crashed-mig:redelivered-again")
        events = await everything(client, "crashed-mig", since)
        state = await client.status("crashed-mig")
    names = [e.name for e in events if e.name in ("evaluation.completed", "migration.graduated")]
    assert names == ["evaluation.completed", "migration.graduated", "evaluation.completed"], "graduated once"
    assert state is not None and state.iterations[0].decision_published


async def until_published(client: Client, migration_id: str, timeout_s: float = 20.0) -> None:
    """Wait until the coordinator has recorded that the first iteration's decision went out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (state := await client.status(migration_id)) is None or not state.iterations[0].decision_published:
        assert asyncio.get_running_loop().time() < deadline, f"{migration_id}'s decision was never published"
        await asyncio.sleep(0.1)
