"""The bridge on a real redis-server and the real nats-server: requests in through a Redis stream, events back out.

A plain `redis` client plays the team's producer and consumer; a scripted coordinator answers on NATS.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from llamaduo.bus.provisioning import EVENTS_STREAM
from llamaduo.contract import encode
from llamaduo.embedded.nats_server import NatsServer
from llamaduo_bridge.app import Bridge
from llamaduo_bridge.ops import ops_server
from llamaduo_bridge.settings import BridgeSettings
from tests.support.brokers import (
    BrokerProcess,
    ScriptedCoordinator,
    eventually,
    make_request,
    private_bridge_settings,
    reaches,
    redis_server,
    running_bridge,
)

__all__ = ["redis_server"]
pytestmark = pytest.mark.integration
REQUESTED = "io.llamaduo.v1.migration.requested"


@pytest.fixture(scope="module")
async def coordinator(nats_server: NatsServer) -> AsyncIterator[ScriptedCoordinator]:
    scripted = await ScriptedCoordinator(nats_server.url).start()
    yield scripted
    await scripted.stop()


@pytest.fixture
async def client(redis_server: BrokerProcess) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def bridge(
    redis_server: BrokerProcess, nats_server: NatsServer, coordinator: ScriptedCoordinator
) -> AsyncIterator[Bridge]:
    async with running_bridge(
        private_bridge_settings("redis", redis_server.url, nats_server.url, bridge_redis_claim_idle_s=0.3)
    ) as running:
        yield running


def _fields(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in raw.items()}


async def _event_out(client: Redis, stream: str, migration_id: str) -> dict[str, str]:
    async def find() -> dict[str, str] | None:
        for _, raw in await client.xrange(stream):
            fields = _fields(raw)
            if json.loads(fields["data"])["migration_id"] == migration_id:
                return fields
        return None

    return await eventually(find, f"an event for {migration_id} on {stream}")


async def _pending(client: Redis, bridge: Bridge) -> int:
    info = await client.xpending(bridge.settings.inbound, bridge.settings.group)
    return int(info["pending"])


async def test_request_from_a_redis_producer_graduates_back_on_redis(
    bridge: Bridge, client: Redis, coordinator: ScriptedCoordinator
) -> None:
    migration_id = f"redis-{uuid.uuid4().hex[:8]}"
    await client.xadd(
        bridge.settings.inbound,
        {
            "ce_specversion": "1.0",
            "ce_id": f"order-{migration_id}",
            "ce_type": REQUESTED,
            "ce_source": "tests/redis-producer",
            "content-type": "application/json",
            "data": encode(make_request(migration_id)),
        },
    )
    out = await _event_out(client, bridge.settings.outbound, migration_id)

    assert coordinator.requests[migration_id] == [f"order-{migration_id}"]  # same CloudEvents id on NATS
    assert out["ce_type"] == "io.llamaduo.v1.migration.graduated"
    assert out["ce_specversion"] == "1.0"
    assert out["ce_subject"] == migration_id
    assert out["ce_source"] == "scripted-coordinator"
    assert out["ce_id"] and out["ce_time"]
    assert out["content-type"] == "application/json"
    assert json.loads(out["data"])["adapter"]["uri"].endswith("adapter.tar")
    assert await _pending(client, bridge) == 0  # acknowledged once NATS had it


async def test_redelivered_entry_does_not_start_a_second_migration(
    bridge: Bridge, client: Redis, coordinator: ScriptedCoordinator, nats_server: NatsServer
) -> None:
    migration_id = f"redis-{uuid.uuid4().hex[:8]}"
    cloudevent = {
        "specversion": "1.0",
        "id": f"structured-{migration_id}",
        "type": REQUESTED,
        "source": "tests/redis-producer",
        "data": json.loads(encode(make_request(migration_id))),
    }
    settings = bridge.settings
    # A bridge replica takes the entry (XREADGROUP in the same transaction as the XADD, so ours can't take it
    # first) and crashes after NATS accepted the event but before its XACK: the entry stays pending.
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(settings.inbound, {"data": json.dumps(cloudevent)})
        pipe.xreadgroup(settings.group, "crashed-replica", {settings.inbound: ">"}, count=1)
        await pipe.execute()
    crashed = Bridge(settings.model_copy(update={"bridge_name": "crashed"}))
    await crashed.link.connect()
    from llamaduo_bridge.cloudevents import parse_inbound

    inbound = parse_inbound(json.dumps(cloudevent).encode(), {}, None, "tests")
    await crashed.link.publish(
        "llamaduo.v1.migration.requested", encode(inbound.event), inbound.nats_headers(), event_id=inbound.ce_id
    )
    await crashed.link.close()

    # Redis redelivers it (our bridge claims the idle entry); JetStream drops the duplicate.
    async def settled() -> bool | None:
        return True if await _pending(client, bridge) == 0 else None

    await eventually(settled, "the redelivered entry to be acknowledged")
    await _event_out(client, settings.outbound, migration_id)
    assert bridge.handler.counters.duplicates == 1
    assert await coordinator.stream_requests(migration_id) == 1
    assert coordinator.requests[migration_id] == [f"structured-{migration_id}"]


async def test_invalid_entries_land_in_the_dead_letter_stream_with_the_error(bridge: Bridge, client: Redis) -> None:
    bad = json.loads(encode(make_request("redis-valid-id")))
    bad["migration_id"] = "Not A Valid Id!"
    await client.xadd(bridge.settings.inbound, {"ce_type": REQUESTED, "ce_id": "bad-1", "data": json.dumps(bad)})
    await client.xadd(bridge.settings.inbound, {"ce_type": REQUESTED, "ce_id": "bad-2", "payload": "{}"})

    async def two() -> list[dict[str, str]] | None:
        entries = [_fields(raw) for _, raw in await client.xrange(bridge.settings.dead_letter)]
        return entries if len(entries) == 2 else None

    first, second = await eventually(two, "two dead letters")
    assert first["ce_id"] == "bad-1"
    assert first["llamaduo-error-reason"] == "schema_violation"
    assert "migration_id" in first["llamaduo-error-detail"]
    assert first["data"] == json.dumps(bad)  # the original entry, untouched
    assert second["llamaduo-error-reason"] == "missing_data"
    await reaches(lambda: bridge.handler.counters.dead_lettered, 2, "dead letters counted")
    assert await _pending(client, bridge) == 0
    assert not await client.xlen(bridge.settings.outbound) if await client.exists(bridge.settings.outbound) else True


async def test_nats_outage_stops_consuming_without_losing_the_request(
    bridge: Bridge, client: Redis, coordinator: ScriptedCoordinator, nats_server: NatsServer
) -> None:
    migration_id = f"redis-{uuid.uuid4().hex[:8]}"
    nats_server.stop()
    try:
        await client.xadd(
            bridge.settings.inbound,
            {"ce_type": REQUESTED, "ce_id": f"outage-{migration_id}", "data": encode(make_request(migration_id))},
        )

        async def held() -> bool | None:
            return True if await _pending(client, bridge) == 1 else None

        await eventually(held, "the bridge to hold the entry unacknowledged")
        assert bridge.handler.counters.published == 0
        assert bridge.handler.counters.dead_lettered == 0
    finally:
        nats_server.start()
    out = await _event_out(
        client,
        bridge.settings.outbound,
        migration_id,
    )
    assert out["ce_subject"] == migration_id
    assert coordinator.requests[migration_id] == [f"outage-{migration_id}"]
    assert await _pending(client, bridge) == 0


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_health_asks_both_buses_and_metrics_count_what_the_bridge_did(
    bridge: Bridge, client: Redis, coordinator: ScriptedCoordinator
) -> None:
    server = ops_server(bridge.settings, bridge.link, bridge.adapter, bridge.handler.counters)
    await server.start()
    try:
        status, body = await _get(server.port, "/health")
        report = json.loads(body)
        assert status == 200 and report["status"] == "ok", report
        assert report["broker"]["connected"] and "rtt_ms" in report["broker"]
        assert report["external"] == {"bus": "redis", "connected": True}

        await client.xadd(bridge.settings.inbound, {"data": encode(make_request("health-1"))})
        await client.xadd(bridge.settings.inbound, {"data": b"{not json"})
        await _event_out(client, bridge.settings.outbound, "health-1")

        async def counted() -> str | None:
            text = (await _get(server.port, "/metrics"))[1].decode()
            wanted = (
                'llamaduo_bridge_inbound_messages{bus="redis",outcome="published"} 1.0',
                'llamaduo_bridge_inbound_messages{bus="redis",outcome="dead_lettered"} 1.0',
                'llamaduo_bridge_forwarded_events{bus="redis"} 1.0',
            )
            return text if all(line in text for line in wanted) else None

        text = await eventually(counted, "the request, the dead letter and the forwarded event in /metrics")
        assert 'llamaduo_bridge_dead_lettered_messages{bus="redis",reason=' in text
    finally:
        await server.stop()


async def test_health_is_unavailable_before_the_bridge_has_connected(redis_server: BrokerProcess) -> None:
    settings = BridgeSettings(bridge_bus="redis", bridge_url=redis_server.url, nats_url="nats://127.0.0.1:1")
    idle = Bridge(settings)
    server = ops_server(settings, idle.link, idle.adapter, idle.handler.counters)
    await server.start()
    try:
        status, body = await _get(server.port, "/health")
    finally:
        await server.stop()
    report = json.loads(body)
    assert status == 503 and report["status"] == "unavailable"
    assert report["broker"] == {"connected": False, "error": "not connected yet"}
    assert report["external"]["connected"] is False


@pytest.mark.parametrize(("start", "taken"), [("earliest", True), ("latest", False)])
async def test_a_request_appended_before_the_bridge_first_ran_is_taken_unless_told_latest(
    redis_server: BrokerProcess,
    nats_server: NatsServer,
    coordinator: ScriptedCoordinator,
    client: Redis,
    start: str,
    taken: bool,
) -> None:
    settings = private_bridge_settings("redis", redis_server.url, nats_server.url, bridge_inbound_start=start)
    name = settings.bridge_name
    migration_id = f"redis-early-{name}"
    # The team's producer runs first: the stream exists and holds the request, no consumer group yet.
    await client.xadd(settings.inbound, {"ce_id": f"early-{name}", "data": encode(make_request(migration_id))})
    late = Bridge(settings)
    await late.open()
    try:
        # The outbound consumer exists before the first request is taken: an event published before it (with
        # `deliver: new`) would never be forwarded.
        assert late.link.js is not None
        await late.link.js.consumer_info(EVENTS_STREAM, settings.consumer_name)
        await late.adapter.broker.start()
        late.start_forwarding()
        if taken:
            await _event_out(client, settings.outbound, migration_id)
            assert coordinator.requests[migration_id] == [f"early-{name}"]
        else:
            newer = f"redis-late-{name}"
            await client.xadd(settings.inbound, {"data": encode(make_request(newer))})
            await _event_out(client, settings.outbound, newer)  # it runs, and reads only what came after it
            assert migration_id not in coordinator.requests
    finally:
        await late.stop()
