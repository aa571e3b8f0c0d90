"""The coordinator alone on the real bus: validation failures, duplicates, cancel, and its decisions."""

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llamaduo.bus import Publisher
from llamaduo.client import Client
from llamaduo.contract import (
    EvaluationCompleted,
    MetricSummary,
    MigrationSpec,
    Spend,
)
from llamaduo.embedded.nats_server import NatsServer
from llamaduo_coordinator.app import create_app
from llamaduo_coordinator.settings import CoordinatorSettings

pytestmark = pytest.mark.integration


def chat(i: int) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
    )


@pytest.fixture
def settings(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        yield CoordinatorSettings(
            nats_url=server.url,
            store_url=(tmp_path / "store").as_uri(),
            ack_wait_s=5,
            retry_base_delay_s=0.2,
            coverage_dirs=str(tmp_path / "allowed"),
        )


@contextlib.asynccontextmanager
async def coordinator(settings: CoordinatorSettings):
    app = create_app(settings)
    await app.start()
    try:
        async with Client(settings, settings) as client:
            yield client
    finally:
        await app.stop()


def spec_for(path: Path, **overrides) -> MigrationSpec:
    raw = {"task": {"name": "t"}, "coverage": {"uri": str(path), "test_fraction": 0.25}}
    raw.update(overrides)
    return MigrationSpec.model_validate(raw)


async def events_until_quiet(client: Client, migration_id: str, since: datetime, count: int) -> list:
    """Up to `count` events, or fewer when the migration goes quiet for 3 s."""
    out = []
    with contextlib.suppress(TimeoutError):
        async for event in client.follow(migration_id, since, idle_timeout=3):
            out.append(event)
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize(
    ("lines", "detail"),
    [
        ([chat(1), chat(2), "{broken", chat(4)], "line 3: invalid JSON"),
        ([chat(i) for i in range(3)], "too few rows to split: 3 rows"),
        (
            [json.dumps({"messages": [{"role": "user", "content": "q"}]})],
            "line 1: the row does not end with an assistant",
        ),
    ],
)
async def test_an_invalid_coverage_dataset_fails_the_migration_with_its_reason(settings, tmp_path, lines, detail):
    (tmp_path / "allowed").mkdir()
    coverage = tmp_path / "allowed" / "coverage.jsonl"
    coverage.write_text("\n".join(lines) + "\n")
    async with coordinator(settings) as client:
        since = datetime.now(UTC)
        # Bypass the CLI's own pre-check: the coordinator must defend itself too.
        ref = client.upload_coverage
        client.upload_coverage = lambda spec, mid: spec  # type: ignore[method-assign]
        await client.submit(spec_for(coverage), "bad-data")
        client.upload_coverage = ref  # type: ignore[method-assign]
        events = await events_until_quiet(client, "bad-data", since, 2)
        state = await client.status("bad-data")
    assert [e.name for e in events] == ["migration.requested", "migration.failed"]
    assert events[1].reason == "invalid_dataset" and detail in events[1].detail
    assert state.status == "failed" and detail in state.failure_detail


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "/etc/hostname", "{tmp}/outside/coverage.jsonl"])
async def test_a_request_naming_a_local_file_outside_the_store_and_coverage_dirs_is_refused_unread(
    settings, tmp_path, uri
):
    outside = tmp_path / "outside" / "coverage.jsonl"
    outside.parent.mkdir()
    outside.write_text("\n".join(chat(i) for i in range(20)))
    async with coordinator(settings) as client:
        since = datetime.now(UTC)
        client.upload_coverage = lambda spec, mid: spec  # type: ignore[method-assign]
        spec = MigrationSpec.model_validate(
            {"task": {"name": "t"}, "coverage": {"uri": uri.format(tmp=tmp_path), "test_fraction": 0.25}}
        )
        await client.submit(spec, "escape")
        events = await events_until_quiet(client, "escape", since, 2)
    assert [e.name for e in events] == ["migration.requested", "migration.failed"]
    assert events[1].reason == "artifact_outside_store"
    assert "LLAMADUO_COVERAGE_DIRS" in events[1].detail


async def test_duplicate_requests_start_one_migration_and_cancel_ends_it(settings, tmp_path):
    coverage = tmp_path / "coverage.jsonl"
    coverage.write_text("\n".join(chat(i) for i in range(20)))
    async with coordinator(settings) as client:
        since = datetime.now(UTC)
        spec = spec_for(coverage)
        await client.submit(spec, "dup-mig")
        await client.submit(spec, "dup-mig")  # same id: the coordinator keeps the first
        publisher = Publisher(client.js, "test", settings)
        from llamaduo.contract import MigrationRequested

        await publisher.publish(
            MigrationRequested(migration_id="dup-mig", spec=spec.model_copy(update={"migration_id": "dup-mig"})),
            ce_id="dup-mig:another-id",
        )
        events = await events_until_quiet(client, "dup-mig", since, 4)
        names = [e.name for e in events]
        assert names.count("dataset.ready") == 1
        state = await client.status("dup-mig")
        assert state.status == "running" and len(state.iterations) == 1
        assert state.iterations[0].train_rows == 15
        await client.cancel("dup-mig", "changed my mind")
        tail = [e async for e in client.follow("dup-mig", datetime.now(UTC), idle_timeout=5)]
        assert tail[-1].name == "migration.failed" and tail[-1].reason == "cancelled"
        state = await client.status("dup-mig")
    assert state.status == "cancelled" and state.failure_detail == "changed my mind"


async def test_scores_above_the_thresholds_graduate_and_below_ask_for_more(settings, tmp_path):
    coverage = tmp_path / "coverage.jsonl"
    coverage.write_text("\n".join(chat(i) for i in range(20)))
    spec = spec_for(coverage, evaluation={"thresholds": {"similarity": 70}}, synthesis={"first_round_rows": 5})
    async with coordinator(settings) as client:
        publisher = Publisher(client.js, "test", settings)
        outcomes = {}
        for migration_id, score in (("good-mig", 71.0), ("weak-mig", 40.0)):
            since = datetime.now(UTC)
            await client.submit(spec, migration_id)
            _, ready = await events_until_quiet(client, migration_id, since, 2)
            summary = MetricSummary(mean=score, median=score, share_ge_50=1.0, share_ge_70=1.0, judged=5)
            evaluation = EvaluationCompleted(
                migration_id=migration_id,
                iteration=0,
                spec=ready.spec,
                adapter=ready.dataset,
                dataset=ready.dataset,
                test=ready.test,
                judgments=ready.test,
                scores={"similarity": summary, "precision": summary},
                failed_judgments=0,
                spend=Spend(calls=5, usd=0.25),
            )
            await publisher.publish(evaluation)
            await publisher.publish(evaluation, ce_id="redelivered-copy")  # decided once, whatever arrives
            tail = await events_until_quiet(client, migration_id, since, 100)
            outcomes[migration_id] = (tail, await client.status(migration_id))
    good_events, good_state = outcomes["good-mig"]
    assert good_events[-1].name == "migration.graduated"
    assert good_state.status == "graduated" and good_state.spend.usd == pytest.approx(0.25)
    weak_events = [e.name for e in outcomes["weak-mig"][0]]
    assert weak_events.count("migration.need_more_data") == 1
    need = next(e for e in outcomes["weak-mig"][0] if e.name == "migration.need_more_data")
    assert need.new_rows == 5 and need.round_index == 0
