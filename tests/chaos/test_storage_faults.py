"""Storage faults: the S3 endpoint unreachable for a while (retried inside the store, then by redelivery, and the
work completes once it is back), and the directory store's disk full (a clear, terminal `store_full` failure)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio import Minio

from llamaduo.embedded.nats_server import NatsServer
from llamaduo.store import LocalStore, StoreFull
from llamaduo.store.s3 import S3Store
from tests.chaos.faults import TcpProxy, small_disk
from tests.chaos.world import World, judge_spec, responses_event, wait_for, write_coverage
from tests.support.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def proxied_store(proxy: TcpProxy, bucket: str, attempts: int = 5) -> S3Store:
    client = Minio(proxy.address, access_key="testing", secret_key="testing", secure=False)
    store = S3Store(client, bucket, "llamaduo", attempts=attempts)
    store.ensure_bucket()
    return store


def host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def llm():
    with ScriptedLLM(judge_score=80) as server:
        yield server


async def _retried(caplog: pytest.LogCaptureFixture, message: str) -> bool:
    return any(message in record.getMessage() for record in caplog.records)


@pytest.mark.scenario("storage: S3 unavailable, then back")
async def test_an_s3_outage_shorter_than_the_retries_is_ridden_out(s3_endpoint, caplog, scenario) -> None:
    caplog.set_level(logging.INFO)
    with TcpProxy(host_port(s3_endpoint)) as proxy:
        store = proxied_store(proxy, "chaos-s3-blip")
        proxy.cut()
        scenario.fault("S3 endpoint down")
        result: dict[str, object] = {}

        def put() -> None:
            try:
                result["ref"] = store.put_bytes("migrations/blip/shared/x/a.bin", b"payload")
            except Exception as exc:  # reported below
                result["error"] = exc

        writer = threading.Thread(target=put)
        writer.start()
        await wait_for(lambda: _retried(caplog, "S3 request failed; retrying"), "the store to retry", 60)
        proxy.restore()
        await asyncio.to_thread(writer.join, 120)
        assert "error" not in result, result
        assert store.read_bytes(result["ref"]) == b"payload"  # type: ignore[arg-type]


@pytest.mark.scenario("storage: S3 unavailable, then back")
async def test_an_s3_outage_longer_than_the_retries_is_redelivered_and_completes(
    tmp_path: Path, s3_endpoint, llm: ScriptedLLM, caplog, scenario
) -> None:
    caplog.set_level(logging.INFO)
    with TcpProxy(host_port(s3_endpoint)) as proxy, NatsServer(tmp_path / "nats") as server:
        store = proxied_store(proxy, "chaos-s3-outage", attempts=2)
        options = {"s3_endpoint": proxy.address, "s3_access_key": "testing", "s3_secret_key": "testing"}
        async with World(server.url, "s3://chaos-s3-outage/llamaduo", store, llm.base_url, llm.model, **options) as w:
            spec = judge_spec(write_coverage(tmp_path / "coverage.jsonl", "s3-outage"))
            await w.submit(spec, "s3-outage")
            scenario.migrations_started += 1
            event = responses_event(store, "s3-outage", spec)
            proxy.cut()
            scenario.fault("S3 endpoint down")
            await w.publisher.publish(event)
            await wait_for(lambda: _retried(caplog, "task failed; will retry"), "the judge to hand the task back", 120)
            proxy.restore()

            async def evaluated() -> bool:
                return bool(await w.events("llamaduo.v1.evaluation.completed"))

            await wait_for(evaluated, "the evaluation after the outage", 120)
            state = await w.state("s3-outage")
            assert state is not None and state.status != "failed"
            scenario.migrations_completed += 1
            dlq = await w.js.stream_info("LLAMADUO_DEADLETTER")
            assert dlq.state.messages == 0, "a transient outage must not dead-letter anything"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (skipped, saying why, where this process may not mount one)."""
    with contextlib.ExitStack() as stack:
        try:
            mounted = stack.enter_context(small_disk(tmp_path / "disk", 512))
        except PermissionError as exc:
            pytest.skip(str(exc))
        yield mounted


@pytest.mark.scenario("storage: disk full")
async def test_a_full_disk_is_a_clear_terminal_failure(tmp_path: Path, disk: Path, llm: ScriptedLLM, scenario) -> None:
    store = LocalStore(disk / "store")
    with NatsServer(tmp_path / "nats") as server:
        async with World(server.url, store.root.as_uri(), store, llm.base_url, llm.model) as world:
            spec = judge_spec(write_coverage(tmp_path / "coverage.jsonl", "disk-full"))
            await world.submit(spec, "disk-full")
            scenario.migrations_started += 1
            event = responses_event(store, "disk-full", spec)
            filler = disk / "filler"
            with filler.open("wb", buffering=0) as out:
                try:
                    while True:
                        out.write(b"\0" * 4096)
                except OSError:
                    pass  # the disk is full
            scenario.fault("disk full")
            with pytest.raises(StoreFull, match="no space left") as info:
                store.put_bytes("migrations/disk-full/shared/x/big.bin", b"x" * 100_000)
            assert info.value.reason == "store_full"
            assert not list(store.root.rglob("*.partial")), "no partial object is left behind"
            await world.publisher.publish(event)
            letters = await world.dead_letters(1, 60)
            assert [(d.service, d.reason) for d in letters] == [("judge", "store_full")]
            assert "no space left" in letters[0].detail

            async def failed():  # type: ignore[no-untyped-def]
                state = await world.state("disk-full")
                return state if state is not None and state.status == "failed" else None

            state = await wait_for(failed, "the migration to fail", 30)
            assert state.failure_reason == "task_failed:judge:store_full"
            scenario.migrations_completed += 1
