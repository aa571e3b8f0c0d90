"""The coordinator's status endpoint, the client's status/list/resume, and `llamaduo watch/resume/status/list`.

Everything runs against a real nats-server; the coordinator is the real FastStream app. Migration states are
written straight into the KV bucket, so each test sets up exactly the state it is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from llamaduo.bus import Publisher
from llamaduo.cli import app as cli_app
from llamaduo.cli.watch import watch
from llamaduo.client import Client, ResumeRefused
from llamaduo.contract import (
    ArtifactRef,
    MetricSummary,
    MigrationGraduated,
    MigrationResume,
    MigrationSpec,
    Progress,
    Spend,
)
from llamaduo.contract.subjects import STATUS_SUBJECT
from llamaduo.embedded.nats_server import NatsServer
from llamaduo.state import IterationRecord, MigrationState
from llamaduo_coordinator.app import create_app
from llamaduo_coordinator.settings import CoordinatorSettings

pytestmark = pytest.mark.integration

REF = ArtifactRef(uri="file:///tmp/adapter.tar", sha256="0" * 64, size=1)
SCORE = MetricSummary(mean=93.0, median=93.0, share_ge_50=1.0, share_ge_70=1.0, judged=8, ci_low=90.5, ci_high=95.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """This module's own nats-server: no other module's coordinator or leftover events share it."""
    with NatsServer(tmp_path_factory.mktemp("status-nats")) as running:
        yield running


@pytest.fixture
def settings(server: NatsServer, tmp_path: Path) -> CoordinatorSettings:
    return CoordinatorSettings(nats_url=server.url, store_url=(tmp_path / "store").as_uri())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def state_for(migration_id: str, status: str = "running", **updates: Any) -> MigrationState:
    spec = MigrationSpec.model_validate(
        {
            "migration_id": migration_id,
            "task": {"name": "status test"},
            "coverage": {"uri": "file:///tmp/coverage.jsonl"},
            "budgets": {"max_iterations": 3, "max_cost_usd": 1.5, "max_synthetic_rows": 500},
        }
    )
    fields: dict[str, Any] = {
        "migration_id": migration_id,
        "spec": spec,
        "status": status,
        "iteration": 0,
        "iterations": [IterationRecord(iteration=0, dataset=REF, train_rows=40, synthetic_rows=0)],
        "spend": Spend(calls=3, usd=0.05),
    }
    fields.update(updates)
    return MigrationState.model_validate(fields)


async def put_state(client: Client, state: MigrationState) -> None:
    assert await (await client.states()).create(state)


async def request(client: Client, body: bytes, timeout: float = 3.0) -> dict[str, Any]:
    assert client.nc is not None
    reply = await client.nc.request(STATUS_SUBJECT, body, timeout=timeout)
    decoded = json.loads(reply.data)
    assert isinstance(decoded, dict)
    return decoded


def progress(migration_id: str, done: int, total: int | None = 10, **kw: Any) -> Progress:
    fields: dict[str, Any] = {
        "migration_id": migration_id,
        "iteration": 0,
        "service": "trainer",
        "stage": "training",
        "done": done,
        "total": total,
    }
    fields.update(kw)
    return Progress.model_validate(fields)


async def started_coordinator(settings: CoordinatorSettings) -> Any:
    app = create_app(settings)
    await app.start()
    return app


@contextlib.asynccontextmanager
async def coordinator(settings: CoordinatorSettings, replicas: int = 1) -> AsyncIterator[Client]:
    """Coordinator replicas plus a client, once the status endpoint answers (so its subscriptions are live)."""
    apps = [await started_coordinator(settings) for _ in range(replicas)]
    try:
        async with Client(settings, settings) as client:
            for _ in range(100):
                if (await client.list_report(timeout=0.5)).source == "coordinator":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the status endpoint never answered")
            yield client
    finally:
        for app in apps:
            await app.stop()


async def wait_for(check: Any, timeout: float = 5.0) -> Any:
    """Poll the coroutine function `check` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------------------------


async def test_a_known_migration_is_answered_with_its_state_and_latest_progress(settings):
    migration_id, other = new_id("known"), new_id("other")
    async with coordinator(settings) as client:
        await put_state(client, state_for(migration_id))
        await put_state(client, state_for(other))
        publisher = Publisher(client.js, "test", settings)
        await publisher.publish(progress(migration_id, 1), ce_id=f"{migration_id}:p1")
        await asyncio.sleep(0.3)
        await publisher.publish(progress(migration_id, 4, message="step 4"), ce_id=f"{migration_id}:p2")
        await publisher.publish(
            progress(migration_id, 2, service="judge", stage="judging", total=None), ce_id=f"{migration_id}:p3"
        )
        await publisher.publish(progress(other, 9), ce_id=f"{other}:p1")

        async def heard_all() -> dict[str, Any] | None:
            reply = await request(client, json.dumps({"migration_id": migration_id}).encode())
            return reply if len(reply["progress"]) == 2 else None

        reply = await wait_for(heard_all)
        assert reply, "the coordinator never reported both stages"
        report = await client.status_report(migration_id)

    # The wire format: the KV state as JSON, plus progress, eta_s, source and replied_at.
    assert reply["migration_id"] == migration_id and reply["status"] == "running"
    assert reply["spec"]["budgets"]["max_iterations"] == 3 and reply["spend"]["usd"] == pytest.approx(0.05)
    assert reply["source"] == "coordinator" and datetime.fromisoformat(reply["replied_at"])
    by_stage = {(p["service"], p["stage"]): p for p in reply["progress"]}
    training = by_stage[("trainer", "training")]
    assert (training["done"], training["total"], training["message"]) == (4, 10, "step 4")  # latest only
    assert training["rate_per_s"] > 0 and training["eta_s"] > 0
    assert by_stage[("judge", "judging")]["eta_s"] is None  # no total, no ETA
    assert reply["progress"][-1]["stage"] == "judging"  # the last heard of is the current stage, listed last
    assert reply["eta_s"] is None  # ... and without a total its ETA is unknown
    # The client reads the same, on its own clock.
    assert report is not None and report.source == "coordinator" and report.note == ""
    assert report.state == state_for(migration_id).model_copy(
        update={"created_at": report.state.created_at, "updated_at": report.state.updated_at}
    )
    assert {(p.service, p.stage, p.done) for p in report.progress} == {
        ("trainer", "training", 4),
        ("judge", "judging", 2),
    }
    assert report.current is not None and report.current.stage == "judging"


async def test_the_eta_comes_from_the_current_stage_rate(settings):
    migration_id = new_id("eta")
    async with coordinator(settings) as client:
        await put_state(client, state_for(migration_id))
        publisher = Publisher(client.js, "test", settings)
        await publisher.publish(progress(migration_id, 10, total=1000), ce_id=f"{migration_id}:p1")
        await asyncio.sleep(0.5)
        await publisher.publish(progress(migration_id, 20, total=1000), ce_id=f"{migration_id}:p2")

        async def eta() -> float | None:
            reply = await request(client, json.dumps({"migration_id": migration_id}).encode())
            return reply["eta_s"]

        eta_s = await wait_for(eta)
    # 10 units in ~0.5 s, 980 to go: about 49 s (scheduling noise allowed).
    assert eta_s is not None and 20 < eta_s < 60


async def test_unknown_ids_lists_and_malformed_requests(settings):
    first, second = new_id("listed"), new_id("listed")
    async with coordinator(settings) as client:
        await put_state(client, state_for(first, iteration=1, spend=Spend(calls=7, usd=0.25)))
        await put_state(client, state_for(second, "failed", failure_reason="budget:cost"))

        unknown = await request(client, b'{"migration_id": "no-such-migration"}')
        assert unknown["code"] == "unknown_migration" and "unknown migration 'no-such-migration'" in unknown["error"]
        assert await client.status_report("no-such-migration") is None

        for body in (b"{}", b'{"migration_id": null}', b""):
            listing = await request(client, body)
            rows = {row["migration_id"]: row for row in listing["migrations"]}
            assert {first, second} <= set(rows), body
            assert rows[first]["status"] == "running" and rows[first]["iteration"] == 1
            assert rows[first]["spend_usd"] == pytest.approx(0.25) and datetime.fromisoformat(rows[first]["updated_at"])
            assert rows[second]["status"] == "failed" and rows[second]["failure_reason"] == "budget:cost"
            assert listing["truncated"] is False
        report = await client.list_report()
        assert report.source == "coordinator" and {first, second} <= {m.migration_id for m in report.migrations}

        for body in (
            b"not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'"a string"',
            b'{"migration_id": 7}',
            b'{"migration_id": ""}',
            json.dumps({"migration_id": "x" * 5000}).encode(),
        ):
            bad = await request(client, body)
            assert bad["code"] == "bad_request" and bad["error"], body
        # ... and the endpoint still answers.
        good = await request(client, json.dumps({"migration_id": first}).encode())
        assert good["migration_id"] == first


async def test_replicas_share_the_requests_and_each_sees_all_progress(settings):
    migration_id = new_id("replicas")
    async with coordinator(settings, replicas=2) as client:
        await put_state(client, state_for(migration_id))
        await Publisher(client.js, "test", settings).publish(progress(migration_id, 3), ce_id=f"{migration_id}:p")
        assert client.nc is not None
        inbox = client.nc.new_inbox()
        replies = await client.nc.subscribe(inbox)
        await asyncio.sleep(0.3)  # the progress reached both replicas
        for _ in range(8):
            await client.nc.publish(STATUS_SUBJECT, json.dumps({"migration_id": migration_id}).encode(), reply=inbox)
        received = []
        with contextlib.suppress(TimeoutError):
            while True:
                received.append(json.loads((await replies.next_msg(timeout=1.0)).data))
    assert len(received) == 8  # one replica answers each request
    assert all([p["done"] for p in reply["progress"]] == [3] for reply in received)


# --------------------------------------------------------------------------------------------------------------
# Without a coordinator: the client falls back to the KV
# --------------------------------------------------------------------------------------------------------------


async def test_without_a_coordinator_the_client_reads_the_kv_and_says_so(tmp_path):
    migration_id = new_id("fallback")
    with NatsServer(tmp_path / "nats") as lonely:
        settings = CoordinatorSettings(nats_url=lonely.url, store_url=(tmp_path / "store").as_uri())
        async with Client(settings, settings) as client:
            await put_state(client, state_for(migration_id))
            report = await client.status_report(migration_id, timeout=1.0)
            assert report is not None and report.source == "kv" and report.progress == []
            assert report.state.migration_id == migration_id and report.eta_s is None
            assert "no coordinator is running" in report.note and "read from KV" in report.note
            assert await client.status_report("not-there-at-all") is None
            listing = await client.list_report()
            assert listing.source == "kv" and [m.migration_id for m in listing.migrations] == [migration_id]

            # A responder that never answers (a wedged coordinator): the client waits `timeout`, then the KV.
            assert client.nc is not None
            silent = await client.nc.subscribe(STATUS_SUBJECT, queue="coordinator")
            started = asyncio.get_running_loop().time()
            report = await client.status_report(migration_id, timeout=0.3)
            assert asyncio.get_running_loop().time() - started < 2.0
            assert report is not None and report.source == "kv" and "no coordinator answered in 0.3s" in report.note
            await silent.unsubscribe()


# --------------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------------


async def resume_events(client: Client, migration_id: str, since: datetime) -> list[MigrationResume]:
    events: list[MigrationResume] = []
    with contextlib.suppress(TimeoutError):
        async for event in client.follow(migration_id, since, idle_timeout=1.5):
            if isinstance(event, MigrationResume):
                events.append(event)
    return events


async def test_resume_publishes_the_request_with_the_budgets_merged(settings):
    migration_id = new_id("resume")
    async with Client(settings, settings) as client:
        await put_state(client, state_for(migration_id, "failed", failure_reason="budget:iterations"))
        since = datetime.now(UTC)
        request_id = await client.resume(migration_id, {"max_iterations": 6, "max_cost_usd": None}, "more rounds")
        again = await client.resume(migration_id, {"plateau_iterations": 2})
        events = await resume_events(client, migration_id, since)
    assert len(request_id) == 32 and again != request_id
    assert [e.request_id for e in events] == [request_id, again]  # distinct requests, both delivered
    first, second = events
    assert first.reason == "more rounds" and first.budgets is not None
    assert first.budgets.max_iterations == 6 and first.budgets.max_cost_usd is None
    assert first.budgets.max_synthetic_rows == 500  # untouched budgets carry over
    assert second.budgets is not None and second.budgets.plateau_iterations == 2
    assert (second.budgets.max_iterations, second.budgets.max_cost_usd) == (3, 1.5)  # from the state, not `first`


async def test_resume_refuses_unknown_running_and_graduated_migrations_and_bad_budgets(settings):
    running, graduated, cancelled = new_id("running"), new_id("graduated"), new_id("cancelled")
    async with Client(settings, settings) as client:
        await put_state(client, state_for(running))
        await put_state(client, state_for(graduated, "graduated"))
        await put_state(client, state_for(cancelled, "cancelled"))
        since = datetime.now(UTC)
        with pytest.raises(ResumeRefused, match="no migration 'never-submitted'"):
            await client.resume("never-submitted", {})
        with pytest.raises(ResumeRefused, match=f"migration {running} is running; only a failed or cancelled"):
            await client.resume(running, {"max_iterations": 9})
        with pytest.raises(ResumeRefused, match="is graduated"):
            await client.resume(graduated, {})
        with pytest.raises(ResumeRefused, match="max_iterations: Input should be greater than or equal to 1"):
            await client.resume(cancelled, {"max_iterations": 0})
        with pytest.raises(ResumeRefused, match=r"unknown budget fields \['max_epochs'\]"):
            await client.resume(cancelled, {"max_epochs": 3})
        refused = [e for mid in (running, graduated, cancelled) for e in await resume_events(client, mid, since)]
    assert refused == []  # nothing was published


# --------------------------------------------------------------------------------------------------------------
# watch
# --------------------------------------------------------------------------------------------------------------


def graduated_event(migration_id: str) -> MigrationGraduated:
    return MigrationGraduated(
        migration_id=migration_id,
        iteration=0,
        adapter=REF,
        base_model="bundled:smollm2-135m-instruct",
        scores={"similarity": SCORE, "precision": SCORE},
        thresholds={"similarity": 90.0, "precision": 90.0},
        spend=Spend(calls=3, usd=0.05),
    )


async def graduate(client: Client, settings: CoordinatorSettings, migration_id: str) -> None:
    """What the coordinator does when a migration graduates: the state first, then the event."""

    def change(state: MigrationState) -> MigrationState:
        record = state.iterations[0]
        record.adapter, record.scores, record.decision = REF, {"similarity": SCORE, "precision": SCORE}, "graduated"
        state.status = "graduated"
        return state

    await (await client.states()).update(migration_id, change)
    await Publisher(client.js, "test", settings).publish(graduated_event(migration_id))


def recording_console() -> Console:
    return Console(record=True, width=160, file=io.StringIO())


async def test_watch_follows_a_migration_to_its_end(settings):
    migration_id = new_id("watched")
    console = recording_console()
    async with coordinator(settings) as client:
        await put_state(client, state_for(migration_id))
        watching = asyncio.create_task(watch(client, migration_id, console, refresh_s=0.5, tick_s=0.1))
        await asyncio.sleep(0.5)
        publisher = Publisher(client.js, "test", settings)
        await publisher.publish(progress(migration_id, 5, service="inferencer", stage="inference"), ce_id="w:1")
        await asyncio.sleep(0.5)
        assert not watching.done()
        await graduate(client, settings, migration_id)
        outcome = await asyncio.wait_for(watching, timeout=15)
    assert outcome is not None and outcome.ended and outcome.state.status == "graduated"
    text = console.export_text()
    assert f"migration {migration_id}  GRADUATED" in text and "93.0 [90.5, 95.0]" in text and "graduated" in text


async def test_watch_after_a_resume_waits_for_the_resumed_run(settings):
    migration_id = new_id("rewatched")
    console = recording_console()
    async with Client(settings, settings) as client:  # no coordinator: the KV fallback feeds the view
        await put_state(client, state_for(migration_id, "failed", failure_reason="budget:iterations"))
        watching = asyncio.create_task(
            watch(client, migration_id, console, refresh_s=0.3, tick_s=0.1, resumed_after=0, resume_wait_s=30)
        )
        await asyncio.sleep(1.0)
        assert not watching.done()  # the old run's failure is not the end of the resumed one

        def resumed(state: MigrationState) -> MigrationState:
            state.status, state.failure_reason = "running", None
            state.spec = state.spec.model_copy(update={"resumed": 1})
            return state

        await (await client.states()).update(migration_id, resumed)
        await asyncio.sleep(0.6)
        assert not watching.done()
        await graduate(client, settings, migration_id)
        outcome = await asyncio.wait_for(watching, timeout=15)
        assert outcome is not None and outcome.ended and outcome.state.status == "graduated"

        # A resume the coordinator never acts on: the watch gives up after `resume_wait_s` and says so.
        stuck = new_id("stuck")
        await put_state(client, state_for(stuck, "cancelled"))
        outcome = await asyncio.wait_for(
            watch(client, stuck, recording_console(), refresh_s=0.2, tick_s=0.1, resumed_after=0, resume_wait_s=1),
            timeout=15,
        )
        assert outcome is not None and not outcome.ended and outcome.state.status == "cancelled"
        assert await watch(client, "not-a-migration", recording_console()) is None
    assert "resumed 1x" in console.export_text()


async def test_a_resume_watched_through_the_real_coordinator(settings):
    migration_id = new_id("reopened")
    console = recording_console()
    failed = state_for(
        migration_id,
        "failed",
        train=REF,
        test=REF,
        failure_reason="budget:iterations",
        iterations=[IterationRecord(iteration=0, dataset=REF, train_rows=40, synthetic_rows=0, decision="failed")],
    )
    async with coordinator(settings) as client:
        await put_state(client, failed)
        since = datetime.now(UTC)
        await client.resume(migration_id, {"max_iterations": 5})
        watching = asyncio.create_task(
            watch(client, migration_id, console, refresh_s=0.3, tick_s=0.1, resumed_after=0, resume_wait_s=30)
        )

        async def reopened() -> MigrationState | None:
            state = await client.status(migration_id)
            return state if state is not None and state.status == "running" else None

        state = await wait_for(reopened, timeout=10)
        assert state is not None and state.spec.resumed == 1 and state.spec.budgets.max_iterations == 5
        await asyncio.sleep(0.5)
        assert not watching.done()
        await graduate(client, settings, migration_id)
        outcome = await asyncio.wait_for(watching, timeout=15)
        names = [event.name async for event in client.follow(migration_id, since, idle_timeout=1.0)]
    assert outcome is not None and outcome.ended and outcome.state.status == "graduated"
    assert names[:2] == ["migration.resume", "dataset.ready"] and names[-1] == "migration.graduated"


# --------------------------------------------------------------------------------------------------------------
# The command line (sync tests: the CLI runs its own event loop)
# --------------------------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def cli_env(settings: CoordinatorSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CoordinatorSettings:
    monkeypatch.setenv("LLAMADUO_NATS_URL", settings.nats_url)
    monkeypatch.setenv("LLAMADUO_STORE_URL", settings.store_url)
    monkeypatch.setenv("LLAMADUO_STATE_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setenv("COLUMNS", "160")  # rich sizes tables to the terminal; CliRunner has none
    return settings


def run_with_client(settings: CoordinatorSettings, work: Any) -> Any:
    async def go() -> Any:
        async with Client(settings, settings) as client:
            return await work(client)

    return asyncio.run(go())


def test_cli_resume_of_an_unknown_or_running_migration_exits_2(cli_env):
    result = runner.invoke(cli_app, ["resume", "no-such-migration", "--max-iterations", "5"])
    assert result.exit_code == 2
    assert "error: no migration 'no-such-migration'" in result.output
    running = new_id("cli-running")
    run_with_client(cli_env, lambda client: put_state(client, state_for(running)))
    result = runner.invoke(cli_app, ["resume", running])
    assert result.exit_code == 2 and "only a failed or cancelled migration can be resumed" in result.output


def test_cli_resume_publishes_the_new_budgets(cli_env):
    migration_id = new_id("cli-resume")
    run_with_client(cli_env, lambda client: put_state(client, state_for(migration_id, "failed")))
    since = datetime.now(UTC)
    result = runner.invoke(
        cli_app, ["resume", migration_id, "--max-iterations", "5", "--deadline-minutes", "30", "--reason", "go on"]
    )
    assert result.exit_code == 0, result.output
    assert f"resume requested for {migration_id} (max_iterations=5, deadline_minutes=30.0" in result.output
    [event] = run_with_client(cli_env, lambda client: resume_events(client, migration_id, since))
    assert event.reason == "go on" and event.budgets is not None
    assert (event.budgets.max_iterations, event.budgets.deadline_minutes, event.budgets.max_cost_usd) == (5, 30.0, 1.5)


def test_cli_status_list_and_watch_read_the_kv_when_no_coordinator_answers(cli_env):
    migration_id = new_id("cli-status")
    run_with_client(cli_env, lambda client: put_state(client, state_for(migration_id, "failed", failure_reason="x")))
    status = runner.invoke(cli_app, ["status", migration_id])
    assert status.exit_code == 0, status.output
    assert f"migration {migration_id}  FAILED" in status.output and "read from KV" in status.output
    listing = runner.invoke(cli_app, ["list"])
    assert listing.exit_code == 0 and migration_id in listing.output and "failed (x)" in listing.output
    assert "list read from KV" in listing.output
    watched = runner.invoke(cli_app, ["watch", migration_id])  # already ended: one frame and the outcome
    assert watched.exit_code == 3 and f"migration {migration_id}: failed" in watched.output
    assert runner.invoke(cli_app, ["watch", "no-such-migration"]).exit_code == 2
    assert runner.invoke(cli_app, ["status", "no-such-migration"]).exit_code == 2
