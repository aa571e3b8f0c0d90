"""The bridge's bus-neutral CloudEvents handling and the native header mappings."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from llamaduo.contract import MigrationCancel, MigrationRequested, encode
from llamaduo_bridge.cloudevents import InvalidMessage, attributes_from_nats, parse_inbound
from llamaduo_bridge.native import read_attributes, write_attributes
from llamaduo_bridge.settings import BUSES, BridgeSettings
from tests.support.brokers import make_request

REQUESTED = "io.llamaduo.v1.migration.requested"


def _body(migration_id: str = "unit-1") -> bytes:
    return encode(make_request(migration_id))


def test_binary_mode_keeps_the_producer_id_source_and_time() -> None:
    attrs = {
        "specversion": "1.0",
        "id": "order-42",
        "type": REQUESTED,
        "source": "shop",
        "time": "2026-01-02T03:04:05Z",
    }
    inbound = parse_inbound(_body(), attrs, "application/json", "bridge")
    assert isinstance(inbound.event, MigrationRequested)
    assert (inbound.mode, inbound.ce_id, inbound.id_derived) == ("binary", "order-42", False)
    headers = inbound.nats_headers()
    assert headers["Nats-Msg-Id"] == headers["ce-id"] == "order-42"
    assert headers["ce-source"] == "shop"
    assert headers["ce-time"] == "2026-01-02T03:04:05Z"
    assert headers["ce-type"] == REQUESTED


@pytest.mark.parametrize("encoding", ["data", "data_base64", "data_as_text"])
def test_structured_mode_in_every_data_encoding(encoding: str) -> None:
    document: dict[str, object] = {"specversion": "1.0", "id": "s-1", "type": REQUESTED, "source": "shop"}
    if encoding == "data":
        document["data"] = json.loads(_body())
    elif encoding == "data_base64":
        document["data_base64"] = base64.b64encode(_body()).decode()
    else:
        document["data"] = _body().decode()
    inbound = parse_inbound(json.dumps(document).encode(), {}, None, "bridge")
    assert (inbound.mode, inbound.ce_id, inbound.event.migration_id) == ("structured", "s-1", "unit-1")


def test_without_an_id_the_same_request_always_gets_the_same_id() -> None:
    first = parse_inbound(_body("unit-2"), {}, None, "bridge")
    again = parse_inbound(_body("unit-2"), {"type": REQUESTED}, None, "bridge")
    assert first.id_derived and first.ce_id == again.ce_id == "unit-2:-:migration.requested"
    assert first.source == "bridge"


def test_a_cancel_is_accepted_by_its_type() -> None:
    body = MigrationCancel(migration_id="unit-3", reason="changed my mind").model_dump_json().encode()
    inbound = parse_inbound(body, {"type": "io.llamaduo.v1.migration.cancel", "id": "c-1"}, None, "bridge")
    assert isinstance(inbound.event, MigrationCancel)


@pytest.mark.parametrize(
    ("body", "attrs", "content_type", "reason", "needle"),
    [
        (b"{oops", {"type": REQUESTED}, None, "invalid_json", "not JSON"),
        (b'{"migration_id": "unit-4"}', {"type": REQUESTED}, None, "schema_violation", "spec"),
        (b"{}", {"type": "io.llamaduo.v1.model.trained"}, None, "unsupported_type", "model.trained"),
        (b"{}", {"type": REQUESTED, "specversion": "0.3"}, None, "unsupported_specversion", "0.3"),
        (b'{"id": "x", "data": {}}', {}, "application/cloudevents+json", "invalid_cloudevent", "specversion"),
        (b'{"specversion": "1.0", "id": "x"}', {}, None, "invalid_cloudevent", "data"),
        (b"[1]", {}, "application/cloudevents+json", "invalid_cloudevent", "JSON object"),
        (None, {"type": REQUESTED, "id": "has space"}, None, "invalid_id", "printable"),
        (None, {"type": REQUESTED, "time": "yesterday"}, None, "invalid_time", "RFC 3339"),
    ],
)
def test_every_bad_message_is_rejected_with_a_reason_naming_the_problem(
    body: bytes | None, attrs: dict[str, str], content_type: str | None, reason: str, needle: str
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_inbound(body if body is not None else _body(), attrs, content_type, "bridge")
    assert caught.value.reason == reason
    assert needle in caught.value.detail


@pytest.mark.parametrize("bus", BUSES)
def test_native_headers_round_trip_on_every_bus(bus: str) -> None:
    nats = {
        "ce-specversion": "1.0",
        "ce-id": "e-1",
        "ce-type": "io.llamaduo.v1.migration.graduated",
        "ce-subject": "unit-5",
        "content-type": "application/json",
        "Nats-Msg-Id": "e-1",
    }
    attributes = attributes_from_nats(nats)
    assert attributes["datacontenttype"] == "application/json"
    native = write_attributes(bus, attributes)  # type: ignore[arg-type]
    assert "datacontenttype" not in {key.lower() for key in native}
    assert read_attributes(bus, native) == {k: v for k, v in attributes.items() if k != "datacontenttype"}  # type: ignore[arg-type]


def test_binding_names_per_bus_and_lenient_reading() -> None:
    attributes = {"id": "e-2", "type": "t"}
    assert write_attributes("kafka", attributes) == {"ce_id": "e-2", "ce_type": "t"}
    assert write_attributes("rabbitmq", attributes) == {"cloudEvents_id": "e-2", "cloudEvents_type": "t"}
    assert write_attributes("mqtt", attributes) == {"id": "e-2", "type": "t"}
    assert read_attributes("rabbitmq", {"cloudEvents:id": b"e-3", "x-other": 1}) == {"id": "e-3"}
    assert read_attributes("kafka", {"id": "bare names only count on MQTT"}) == {}


def test_settings_reject_unknown_forwarded_events_and_know_every_bus() -> None:
    with pytest.raises(ValidationError, match="unknown event"):
        BridgeSettings(bridge_bus="kafka", bridge_forward="migration.graduated,migration.graduatd")
    assert "progress" in BridgeSettings(bridge_bus="redis", bridge_forward="all").forward_events()
    for bus in BUSES:
        settings = BridgeSettings(bridge_bus=bus, bridge_name="eu")
        assert settings.consumer_name == f"bridge-{bus}-eu"
        assert settings.forward_events() == ("migration.graduated", "migration.failed")


@pytest.mark.parametrize("start", ["earliest", "latest"])
def test_the_kafka_consumer_group_starts_where_the_settings_say(start: str) -> None:
    # aiokafka's auto_offset_reset applies to a group with no committed offset: `earliest` takes requests published
    # before the bridge first ran (a real broker is not available here; the Redis test covers the behaviour).
    from llamaduo_bridge.buses import build_adapter
    from llamaduo_bridge.inbound import InboundHandler
    from llamaduo_bridge.nats_link import NatsLink
    from llamaduo_bridge.settings import BridgeSettings

    settings = BridgeSettings(bridge_bus="kafka", bridge_inbound_start=start)
    adapter = build_adapter(settings, InboundHandler(settings, NatsLink(settings)))
    (subscriber,) = adapter.broker.subscribers
    assert subscriber._connection_args["auto_offset_reset"] == start
    assert subscriber._connection_args["enable_auto_commit"] is False
