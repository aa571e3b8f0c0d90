"""Delivery on the real nats-server: shared durables, redelivery of a killed worker's task, heartbeats,
retries with a limit, dead letters with reasons, dedup, and observers that take no work."""

import asyncio
import contextlib
import subprocess
import sys
from datetime import UTC, datetime

import nats
import pytest

from llamaduo.bus import Binding, BusSettings, Publisher, build_app, provision_bus
from llamaduo.client import Client
from llamaduo.contract import MigrationCancel, TaskFailed
from llamaduo.embedded.nats_server import NatsServer

pytestmark = pytest.mark.integration
SUBJECT = "llamaduo.v1.migration.cancel"


@pytest.fixture
def server(tmp_path):
    with NatsServer(tmp_path / "nats") as srv:
        yield srv


def settings_for(server: NatsServer, **overrides) -> BusSettings:
    values = {"nats_url": server.url, "ack_wait_s": 2.0, "heartbeat_s": 0.4, "retry_base_delay_s": 0.1}
    values.update(overrides)
    return BusSettings(**values)


@contextlib.asynccontextmanager
async def running(settings: BusSettings, handle, replicas: int = 1):
    await provision_bus(settings)
    brokers = []
    for _ in range(replicas):
        _, broker = build_app(
            "coordinator", settings, [Binding("coordinator-cancel", "cancel", MigrationCancel, handle, False)]
        )
        await broker.start()
        brokers.append(broker)
    try:
        yield
    finally:
        for broker in brokers:
            await broker.stop()


@contextlib.asynccontextmanager
async def jetstream(settings: BusSettings):
    nc = await nats.connect(settings.nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def drain(js, subject: str, timeout: float = 1.0) -> list:
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    with contextlib.suppress(nats.errors.TimeoutError):
        while True:
            out.append(await sub.next_msg(timeout=timeout))
    await sub.unsubscribe()
    return out


async def test_replicas_share_the_work_and_each_task_runs_once(server):
    settings = settings_for(server)
    seen: list[str] = []

    async def handle(event, ctx):
        seen.append(event.migration_id)
        await asyncio.sleep(0.05)
        return []

    async with running(settings, handle, replicas=2), jetstream(settings) as js:
        publisher = Publisher(js, "test", settings)
        for i in range(20):
            await publisher.publish(MigrationCancel(migration_id=f"mig-{i:03d}"))
        await wait_for(lambda: len(seen) >= 20)
        await asyncio.sleep(0.5)
    assert sorted(seen) == [f"mig-{i:03d}" for i in range(20)]


async def test_duplicate_publish_in_the_window_is_stored_once(server):
    settings = settings_for(server)
    await provision_bus(settings)
    async with jetstream(settings) as js:
        publisher = Publisher(js, "test", settings)
        first = await publisher.publish(MigrationCancel(migration_id="dup-001"))
        second = await publisher.publish(MigrationCancel(migration_id="dup-001"))
        assert not first.duplicate and second.duplicate
        assert len(await drain(js, SUBJECT)) == 1


async def test_a_killed_workers_task_is_redelivered_to_another_replica(server):
    settings = settings_for(server, ack_wait_s=1.5)
    await provision_bus(settings)
    victim = subprocess.Popen(
        [sys.executable, "-m", "tests.support.sleepy_worker", server.url, "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        async with jetstream(settings) as js:
            await Publisher(js, "test", settings).publish(MigrationCancel(migration_id="kill-001"))
            line = await asyncio.wait_for(asyncio.to_thread(victim.stdout.readline), 30)
            assert "TASK-STARTED" in line
            victim.kill()
            victim.wait()
            finished: list[int] = []

            async def handle(event, ctx):
                finished.append(ctx.delivery)
                return []

            async with running(settings, handle):
                await wait_for(lambda: finished, timeout=15)
            assert finished == [2]
    finally:
        victim.kill()


async def test_heartbeats_keep_a_long_task_from_being_redelivered(server):
    settings = settings_for(server, ack_wait_s=1.0, heartbeat_s=0.25)
    deliveries: list[int] = []

    async def slow(event, ctx):
        deliveries.append(ctx.delivery)
        await asyncio.sleep(3.5)
        return []

    async with running(settings, slow, replicas=2), jetstream(settings) as js:
        await Publisher(js, "test", settings).publish(MigrationCancel(migration_id="slow-001"))
        await asyncio.sleep(5)
    assert deliveries == [1]


async def test_transient_failures_are_retried_then_succeed(server):
    settings = settings_for(server, max_deliver=4)
    attempts: list[int] = []

    async def flaky(event, ctx):
        attempts.append(ctx.delivery)
        if len(attempts) < 3:
            raise ConnectionError("service LLM hiccup")
        return [TaskFailed(migration_id=event.migration_id, service="coordinator", stage="probe", reason="ok")]

    async with running(settings, flaky), jetstream(settings) as js:
        await Publisher(js, "test", settings).publish(MigrationCancel(migration_id="flaky-001"))
        await wait_for(lambda: len(attempts) == 3)
        await asyncio.sleep(0.5)
        assert len(await drain(js, "llamaduo.v1.task.failed")) == 1
        assert await drain(js, "llamaduo.v1.deadletter.>", timeout=0.3) == []
    assert attempts == [1, 2, 3]


async def test_exhausted_retries_dead_letter_and_fail_the_migration(server):
    settings = settings_for(server, max_deliver=2)

    async def broken(event, ctx):
        raise RuntimeError("always broken")

    async with running(settings, broken), jetstream(settings) as js:
        await Publisher(js, "test", settings).publish(MigrationCancel(migration_id="broken-001"))
        await asyncio.sleep(2)
        dead = await drain(js, "llamaduo.v1.deadletter.>")
        failed = await drain(js, "llamaduo.v1.task.failed")
    assert len(dead) == 1
    assert dead[0].headers["llamaduo-dlq-reason"] == "retries_exhausted"
    assert "always broken" in dead[0].headers["llamaduo-dlq-detail"]
    assert b"retries_exhausted" in failed[0].data


async def test_poison_goes_to_the_dead_letter_subject_and_the_service_goes_on(server):
    settings = settings_for(server)
    handled: list[str] = []

    async def handle(event, ctx):
        handled.append(event.migration_id)
        return []

    async with running(settings, handle), jetstream(settings) as js:
        await js.publish(SUBJECT, b"\x00\x01 garbage", headers={"Nats-Msg-Id": "p1"})
        await js.publish(SUBJECT, b'{"migration_id": "poison-001", "extra": true}', headers={"Nats-Msg-Id": "p2"})
        await Publisher(js, "test", settings).publish(MigrationCancel(migration_id="good-001"))
        await wait_for(lambda: handled == ["good-001"])
        await asyncio.sleep(0.3)
        dead = await drain(js, "llamaduo.v1.deadletter.coordinator")
        failed = await drain(js, "llamaduo.v1.task.failed")
    reasons = [m.headers["llamaduo-dlq-reason"] for m in dead]
    assert reasons == ["invalid_json", "schema_violation"]
    assert dead[0].data == b"\x00\x01 garbage"
    assert dead[1].headers["llamaduo-dlq-subject"] == SUBJECT
    # Only the message with a readable migration id can fail a migration.
    assert len(failed) == 1 and b"poison-001" in failed[0].data


async def test_an_observer_reads_every_event_without_taking_work(server):
    settings = settings_for(server)
    handled: list[str] = []

    async def handle(event, ctx):
        handled.append(event.migration_id)
        return [TaskFailed(migration_id=event.migration_id, service="coordinator", stage="x", reason="done")]

    async with running(settings, handle), Client(settings, settings) as client:
        since = datetime.now(UTC)
        watcher = asyncio.create_task(anext(client.follow("watch-001", since, idle_timeout=10)))
        await asyncio.sleep(0.3)
        await client.cancel("watch-001")
        first = await watcher
        await wait_for(lambda: handled == ["watch-001"])
    assert isinstance(first, MigrationCancel)


async def test_shutdown_hands_unfinished_work_back_at_once(server):
    settings = settings_for(server, ack_wait_s=30.0, graceful_timeout_s=0.5)
    await provision_bus(settings)
    started: list[int] = []

    async def stubborn(event, ctx):
        started.append(ctx.delivery)
        await asyncio.sleep(60)
        return []

    _, leaving = build_app(
        "coordinator", settings, [Binding("coordinator-cancel", "cancel", MigrationCancel, stubborn, False)]
    )
    await leaving.start()
    async with jetstream(settings) as js:
        await Publisher(js, "test", settings).publish(MigrationCancel(migration_id="shutdown-001"))
        await wait_for(lambda: started == [1])
        await leaving.stop()
        finished: list[int] = []

        async def handle(event, ctx):
            finished.append(ctx.delivery)
            return []

        async with running(settings, handle):
            # Well inside ack_wait (30 s): the stopped replica nak'ed its task instead of sitting on it.
            await wait_for(lambda: finished == [2], timeout=8)
