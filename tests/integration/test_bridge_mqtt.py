"""The bridge on a real mosquitto (MQTT 5) and the real nats-server: requests in on a topic, events back out.

A plain zmqtt client plays the team's producer and consumer; a scripted coordinator answers on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import pytest
import zmqtt

from llamaduo.contract import encode
from llamaduo.embedded.nats_server import NatsServer
from llamaduo_bridge.app import Bridge
from tests.support.brokers import (
    BrokerProcess,
    ScriptedCoordinator,
    eventually,
    make_request,
    mosquitto_server,
    private_bridge_settings,
    reaches,
    running_bridge,
)

__all__ = ["mosquitto_server"]
pytestmark = pytest.mark.integration
REQUESTED = "io.llamaduo.v1.migration.requested"


@pytest.fixture(scope="module")
async def coordinator(nats_server: NatsServer) -> AsyncIterator[ScriptedCoordinator]:
    scripted = await ScriptedCoordinator(nats_server.url).start()
    yield scripted
    await scripted.stop()


@pytest.fixture
async def client(mosquitto_server: BrokerProcess) -> AsyncIterator[zmqtt.MQTTClientV5]:
    url = urlparse(mosquitto_server.url)
    mqtt = zmqtt.create_client(url.hostname or "127.0.0.1", url.port or 1883, version="5.0")
    async with mqtt:
        yield mqtt


@pytest.fixture
async def bridge(
    mosquitto_server: BrokerProcess, nats_server: NatsServer, coordinator: ScriptedCoordinator
) -> AsyncIterator[Bridge]:
    async with running_bridge(private_bridge_settings("mqtt", mosquitto_server.url, nats_server.url)) as running:
        yield running


@contextlib.asynccontextmanager
async def collect(client: zmqtt.MQTTClientV5, topic: str) -> AsyncIterator[list[zmqtt.Message]]:
    """Every message on `topic` while the block runs."""
    received: list[zmqtt.Message] = []
    async with client.subscribe(topic, qos=zmqtt.QoS.AT_LEAST_ONCE) as subscription:

        async def pump() -> None:
            async for message in subscription:
                received.append(message)

        task = asyncio.create_task(pump())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _props(message: zmqtt.Message) -> dict[str, str]:
    assert message.properties is not None
    return dict(message.properties.user_properties)


async def _first(received: list[zmqtt.Message], what: str) -> zmqtt.Message:
    async def first() -> zmqtt.Message | None:
        return received[0] if received else None

    return await eventually(first, what)


async def _request(client: zmqtt.MQTTClientV5, bridge: Bridge, migration_id: str, ce_id: str) -> None:
    properties = zmqtt.PublishProperties(
        content_type="application/json",
        user_properties=(("specversion", "1.0"), ("id", ce_id), ("type", REQUESTED), ("source", "tests/mqtt")),
    )
    await client.publish(
        bridge.settings.inbound, encode(make_request(migration_id)), qos=zmqtt.QoS.AT_LEAST_ONCE, properties=properties
    )


async def test_request_from_an_mqtt_producer_graduates_back_on_mqtt(
    bridge: Bridge, client: zmqtt.MQTTClientV5, coordinator: ScriptedCoordinator
) -> None:
    migration_id = f"mqtt-{uuid.uuid4().hex[:8]}"
    async with collect(client, f"{bridge.settings.outbound}/#") as received:
        await _request(client, bridge, migration_id, f"order-{migration_id}")
        out = await _first(received, "graduated on MQTT")

    props = _props(out)
    assert coordinator.requests[migration_id] == [f"order-{migration_id}"]
    assert out.topic == f"{bridge.settings.outbound}/migration.graduated"
    assert props["type"] == "io.llamaduo.v1.migration.graduated"
    assert props["subject"] == migration_id
    assert props["specversion"] == "1.0"
    assert props["id"]
    assert out.properties is not None and out.properties.content_type == "application/json"
    assert json.loads(out.payload)["migration_id"] == migration_id


async def test_redelivered_request_does_not_start_a_second_migration(
    bridge: Bridge, client: zmqtt.MQTTClientV5, coordinator: ScriptedCoordinator
) -> None:
    migration_id = f"mqtt-{uuid.uuid4().hex[:8]}"
    async with collect(client, f"{bridge.settings.outbound}/#") as received:
        await _request(client, bridge, migration_id, f"twice-{migration_id}")
        await _first(received, "graduated on MQTT")
        # QoS 1 is at-least-once: the same message again (a producer retry or a broker redelivery).
        await _request(client, bridge, migration_id, f"twice-{migration_id}")

        async def counted() -> bool | None:
            return True if bridge.handler.counters.duplicates == 1 else None

        await eventually(counted, "the second delivery to be seen as a duplicate")
    assert await coordinator.stream_requests(migration_id) == 1
    assert coordinator.requests[migration_id] == [f"twice-{migration_id}"]


async def test_invalid_message_goes_to_the_dead_letter_topic_with_the_error(
    bridge: Bridge, client: zmqtt.MQTTClientV5
) -> None:
    async with collect(client, bridge.settings.dead_letter) as received:
        properties = zmqtt.PublishProperties(user_properties=(("type", "io.llamaduo.v1.model.trained"),))
        await client.publish(bridge.settings.inbound, b"{}", qos=zmqtt.QoS.AT_LEAST_ONCE, properties=properties)
        dead = await _first(received, "a dead letter")
    props = _props(dead)
    assert dead.payload == b"{}"
    assert props["llamaduo-error-reason"] == "unsupported_type"
    assert "io.llamaduo.v1.model.trained" in props["llamaduo-error-detail"]
    assert props["type"] == "io.llamaduo.v1.model.trained"
    await reaches(lambda: bridge.handler.counters.dead_lettered, 1, "dead letters counted")


async def test_unacknowledged_request_is_redelivered_to_the_bridge_session_after_a_nats_outage(
    bridge: Bridge,
    client: zmqtt.MQTTClientV5,
    coordinator: ScriptedCoordinator,
    nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    migration_id = f"mqtt-{uuid.uuid4().hex[:8]}"
    async with collect(client, f"{bridge.settings.outbound}/#") as received:
        nats_server.stop()
        try:
            await _request(client, bridge, migration_id, f"outage-{migration_id}")

            async def holding() -> bool | None:
                # The bridge took it and waits for NATS (it says so): no PUBACK sent, nothing published.
                held = [r for r in caplog.records if getattr(r, "event_id", None) == f"outage-{migration_id}"]
                return True if any("holding the message" in r.getMessage() for r in held) else None

            await eventually(holding, "the bridge to hold the request")
            assert bridge.handler.counters.published == bridge.handler.counters.dead_lettered == 0
            await bridge.stop()  # no PUBACK was sent: mosquitto keeps the message in the bridge's session
        finally:
            nats_server.start()
        successor = Bridge(bridge.settings)  # same client id: the same persistent session
        await successor.start()
        try:
            out = await _first(received, "graduated after the redelivery")
            assert json.loads(out.payload)["migration_id"] == migration_id
            assert coordinator.requests[migration_id] == [f"outage-{migration_id}"]
            assert successor.handler.counters.published == 1
        finally:
            await successor.stop()
