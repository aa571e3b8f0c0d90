"""The Kafka path of the bridge: FastStream's in-memory Kafka test broker (Kafka has no Debian package to run here)
and the real nats-server. Producer and consumer are FastStream Kafka publishers/subscribers on the same broker.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import pytest
from faststream.kafka import KafkaBroker, KafkaMessage, TestKafkaBroker

from llamaduo.bus.publisher import Publisher
from llamaduo.bus.settings import BusSettings
from llamaduo.contract import Progress, encode
from llamaduo.embedded.nats_server import NatsServer
from llamaduo_bridge.app import Bridge
from llamaduo_bridge.settings import BridgeSettings
from tests.support.brokers import ScriptedCoordinator, eventually, graduated_for, make_request

pytestmark = pytest.mark.integration
REQUESTED = "io.llamaduo.v1.migration.requested"


@dataclass
class KafkaBridge:
    bridge: Bridge
    broker: KafkaBroker
    events: list[KafkaMessage] = field(default_factory=list)
    dead: list[KafkaMessage] = field(default_factory=list)

    async def produce(self, body: bytes, headers: dict[str, str]) -> None:
        await self.broker.publish(body, topic=self.bridge.settings.inbound, headers=headers)

    async def event_for(self, migration_id: str) -> KafkaMessage:
        async def find() -> KafkaMessage | None:
            return next((m for m in self.events if json.loads(m.body)["migration_id"] == migration_id), None)

        return await eventually(find, f"an event for {migration_id}")


@pytest.fixture(scope="module")
async def coordinator(nats_server: NatsServer) -> AsyncIterator[ScriptedCoordinator]:
    scripted = await ScriptedCoordinator(nats_server.url).start()
    yield scripted
    await scripted.stop()


@contextlib.asynccontextmanager
async def kafka_bridge(
    nats_url: str, forward: str = "migration.graduated,migration.failed"
) -> AsyncIterator[KafkaBridge]:
    """A bridge on FastStream's in-memory Kafka broker, with the team's consumers of its events and dead letters."""
    name = uuid.uuid4().hex[:8]
    settings = BridgeSettings(
        bridge_bus="kafka",
        nats_url=nats_url,
        bridge_name=name,
        bridge_forward=forward,
        bridge_inbound=f"requests.{name}",
        bridge_outbound=f"events.{name}",
        bridge_dead_letter=f"dlq.{name}",
        bridge_retry_max_s=0.5,
    )
    bridge = Bridge(settings)
    state = KafkaBridge(bridge, bridge.adapter.broker)

    # The team's consumers of the events topic and of the dead-letter topic.
    @state.broker.subscriber(settings.outbound, group_id="team-events")
    async def on_event(msg: KafkaMessage) -> None:
        state.events.append(msg)

    @state.broker.subscriber(settings.dead_letter, group_id="team-dlq")
    async def on_dead_letter(msg: KafkaMessage) -> None:
        state.dead.append(msg)

    async with TestKafkaBroker(state.broker):
        await bridge.open(connect_bus=False)
        await bridge.link.ensure_consumer()
        bridge.start_forwarding()
        try:
            yield state
        finally:
            await bridge.stop(stop_bus=False)


@pytest.fixture
async def kafka(nats_server: NatsServer, coordinator: ScriptedCoordinator) -> AsyncIterator[KafkaBridge]:
    async with kafka_bridge(nats_server.url) as state:
        yield state


async def test_request_from_a_kafka_producer_graduates_back_on_kafka(
    kafka: KafkaBridge, coordinator: ScriptedCoordinator
) -> None:
    migration_id = f"kafka-{uuid.uuid4().hex[:8]}"
    headers = {
        "ce_specversion": "1.0",
        "ce_id": f"order-{migration_id}",
        "ce_type": REQUESTED,
        "ce_source": "tests/kafka-producer",
        "content-type": "application/json",
    }
    await kafka.produce(encode(make_request(migration_id)), headers)

    out = await kafka.event_for(migration_id)
    assert coordinator.requests[migration_id] == [f"order-{migration_id}"]
    assert out.headers["ce_type"] == "io.llamaduo.v1.migration.graduated"
    assert out.headers["ce_subject"] == migration_id
    assert out.headers["ce_specversion"] == "1.0"
    assert out.headers["ce_id"]
    assert out.headers["content-type"] == "application/json"
    assert out.raw_message.key == migration_id.encode()  # keyed by migration: per-migration order


async def test_redelivered_request_does_not_start_a_second_migration(
    kafka: KafkaBridge, coordinator: ScriptedCoordinator
) -> None:
    migration_id = f"kafka-{uuid.uuid4().hex[:8]}"
    # No id from the producer: the bridge derives the same stable id for the same request both times.
    body = encode(make_request(migration_id))
    await kafka.produce(body, {"ce_type": REQUESTED})
    await kafka.event_for(migration_id)
    await kafka.produce(body, {"ce_type": REQUESTED})  # redelivered from the last committed offset

    assert kafka.bridge.handler.counters.duplicates == 1
    assert await coordinator.stream_requests(migration_id) == 1
    assert coordinator.requests[migration_id] == [f"{migration_id}:-:migration.requested"]


async def test_invalid_message_goes_to_the_dead_letter_topic_with_the_error(kafka: KafkaBridge) -> None:
    await kafka.produce(b'{"specversion": "0.3", "id": "x", "type": "t", "data": {}}', {})

    async def dead() -> KafkaMessage | None:
        return kafka.dead[0] if kafka.dead else None

    message = await eventually(dead, "a dead letter")
    assert message.headers["llamaduo-error-reason"] == "unsupported_specversion"
    assert "0.3" in message.headers["llamaduo-error-detail"]
    assert json.loads(message.body)["specversion"] == "0.3"
    assert kafka.bridge.handler.counters.dead_lettered == 1


async def test_only_the_configured_events_are_forwarded(
    nats_server: NatsServer, coordinator: ScriptedCoordinator
) -> None:
    migration_id = f"kafka-{uuid.uuid4().hex[:8]}"
    async with kafka_bridge(nats_server.url, forward="progress") as kafka:
        connection = await nats.connect(nats_server.url)
        try:
            publisher = Publisher(connection.jetstream(), "tests", BusSettings(nats_url=nats_server.url))
            await publisher.publish(graduated_for(migration_id))  # not forwarded: not in LLAMADUO_BRIDGE_FORWARD
            await publisher.publish(
                Progress(migration_id=migration_id, service="trainer", stage="train", done=3, total=10)
            )
        finally:
            await connection.close()
        out = await kafka.event_for(migration_id)
        # The consumer delivers in stream order: graduated came first and was filtered out, not merely late.
        assert out.headers["ce_type"] == "io.llamaduo.v1.progress"
        assert [m.headers["ce_type"] for m in kafka.events] == ["io.llamaduo.v1.progress"]
