"""The bridge on a real rabbitmq-server and the real nats-server: requests from a queue, events to an exchange.

A plain aio-pika client plays the team's producer and consumer; a scripted coordinator answers on NATS.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from llamaduo.contract import encode
from llamaduo.embedded.nats_server import NatsServer
from llamaduo_bridge.app import Bridge
from tests.support.brokers import (
    BrokerProcess,
    ScriptedCoordinator,
    eventually,
    make_request,
    private_bridge_settings,
    rabbitmq_server,
    reaches,
    running_bridge,
)

__all__ = ["rabbitmq_server"]
pytestmark = pytest.mark.integration
REQUESTED = "io.llamaduo.v1.migration.requested"


@pytest.fixture(scope="module")
async def coordinator(nats_server: NatsServer) -> AsyncIterator[ScriptedCoordinator]:
    scripted = await ScriptedCoordinator(nats_server.url).start()
    yield scripted
    await scripted.stop()


@pytest.fixture
async def channel(rabbitmq_server: BrokerProcess) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(rabbitmq_server.url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


@pytest.fixture
async def bridge(
    rabbitmq_server: BrokerProcess, nats_server: NatsServer, coordinator: ScriptedCoordinator
) -> AsyncIterator[Bridge]:
    async with running_bridge(private_bridge_settings("rabbitmq", rabbitmq_server.url, nats_server.url)) as running:
        yield running


async def _events_queue(channel: aio_pika.abc.AbstractChannel, bridge: Bridge) -> aio_pika.abc.AbstractQueue:
    """The team's own queue bound to the bridge's exchange for the terminal events."""
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(bridge.settings.outbound, routing_key="migration.*")
    return queue


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async def get() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(no_ack=True, fail=False)

    return await eventually(get, f"a message on {queue.name}")


async def _send(channel: aio_pika.abc.AbstractChannel, bridge: Bridge, message: aio_pika.Message) -> None:
    await channel.default_exchange.publish(message, routing_key=bridge.settings.inbound)


def _binary(migration_id: str, ce_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        encode(make_request(migration_id)),
        content_type="application/json",
        headers={
            "cloudEvents_specversion": "1.0",
            "cloudEvents_id": ce_id,
            "cloudEvents_type": REQUESTED,
            "cloudEvents_source": "tests/rabbit-producer",
        },
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def test_request_from_a_rabbitmq_producer_graduates_back_on_rabbitmq(
    bridge: Bridge, channel: aio_pika.abc.AbstractChannel, coordinator: ScriptedCoordinator
) -> None:
    events = await _events_queue(channel, bridge)
    migration_id = f"rabbit-{uuid.uuid4().hex[:8]}"
    await _send(channel, bridge, _binary(migration_id, f"order-{migration_id}"))

    out = await _next(events)
    headers = {key: str(value) for key, value in (out.headers or {}).items()}
    assert coordinator.requests[migration_id] == [f"order-{migration_id}"]
    assert out.routing_key == "migration.graduated"
    assert headers["cloudEvents_type"] == "io.llamaduo.v1.migration.graduated"
    assert headers["cloudEvents_subject"] == migration_id
    assert headers["cloudEvents_specversion"] == "1.0"
    assert out.message_id == headers["cloudEvents_id"]
    assert out.content_type == "application/json"
    assert json.loads(out.body)["migration_id"] == migration_id
    inbound = await channel.declare_queue(bridge.settings.inbound, passive=True)
    assert inbound.declaration_result.message_count == 0


async def test_redelivered_request_does_not_start_a_second_migration(
    bridge: Bridge, channel: aio_pika.abc.AbstractChannel, coordinator: ScriptedCoordinator
) -> None:
    events = await _events_queue(channel, bridge)
    migration_id = f"rabbit-{uuid.uuid4().hex[:8]}"
    structured = {
        "specversion": "1.0",
        "id": f"structured-{migration_id}",
        "type": REQUESTED,
        "source": "tests/rabbit-producer",
        "data": json.loads(encode(make_request(migration_id))),
    }
    message = aio_pika.Message(json.dumps(structured).encode(), content_type="application/cloudevents+json")
    await _send(channel, bridge, message)
    await _next(events)
    # The same message again, as RabbitMQ redelivers it after a consumer died before its ack.
    await _send(channel, bridge, message)

    async def counted() -> bool | None:
        return True if bridge.handler.counters.duplicates == 1 else None

    await eventually(counted, "the redelivery to be seen as a duplicate")
    assert await coordinator.stream_requests(migration_id) == 1
    assert coordinator.requests[migration_id] == [f"structured-{migration_id}"]


async def test_invalid_message_is_dead_lettered_with_the_error(
    bridge: Bridge, channel: aio_pika.abc.AbstractChannel
) -> None:
    await _send(channel, bridge, aio_pika.Message(b"not json", headers={"cloudEvents_type": REQUESTED}))
    dlq = await channel.declare_queue(bridge.settings.dead_letter, passive=True)

    async def get() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await dlq.get(no_ack=True, fail=False)

    dead = await eventually(get, "a dead letter")
    headers = {key: str(value) for key, value in (dead.headers or {}).items()}
    assert dead.body == b"not json"
    assert headers["llamaduo-error-reason"] == "invalid_json"
    assert "body is not JSON" in headers["llamaduo-error-detail"]
    await reaches(lambda: bridge.handler.counters.dead_lettered, 1, "dead letters counted")
    inbound = await channel.declare_queue(bridge.settings.inbound, passive=True)
    assert inbound.declaration_result.message_count == 0


async def test_nats_outage_holds_the_request_and_a_stopped_bridge_hands_it_back(
    bridge: Bridge,
    channel: aio_pika.abc.AbstractChannel,
    coordinator: ScriptedCoordinator,
    nats_server: NatsServer,
) -> None:
    events = await _events_queue(channel, bridge)
    migration_id = f"rabbit-{uuid.uuid4().hex[:8]}"
    nats_server.stop()
    try:
        await _send(channel, bridge, _binary(migration_id, f"outage-{migration_id}"))

        async def held() -> bool | None:
            queue = await channel.declare_queue(bridge.settings.inbound, passive=True)
            # Delivered to the bridge, not acknowledged: not ready in the queue, not dead-lettered, not published.
            return True if queue.declaration_result.message_count == 0 else None

        await eventually(held, "the bridge to take the request and hold it")
        assert bridge.handler.counters.published == bridge.handler.counters.dead_lettered == 0
        await bridge.stop()  # the bridge goes away while NATS is still down

        async def returned() -> bool | None:
            queue = await channel.declare_queue(bridge.settings.inbound, passive=True)
            return True if queue.declaration_result.message_count == 1 else None

        await eventually(returned, "the held request to be back in the queue")
    finally:
        nats_server.start()
    successor = Bridge(bridge.settings)
    await successor.start()
    try:
        out = await _next(events)
        assert json.loads(out.body)["migration_id"] == migration_id
        assert coordinator.requests[migration_id] == [f"outage-{migration_id}"]
    finally:
        await successor.stop()
