"""The runtime hardening the chaos suite asked for, pinned at the unit level: event size limits, poison that names no
usable migration, bodies nested too deeply, and decode never raising anything but `PoisonMessage`."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaduo.bus import BusSettings, Publisher
from llamaduo.contract import (
    ALL_EVENTS,
    MAX_EVENT_BYTES,
    EventTooLarge,
    MigrationRequested,
    MigrationSpec,
    PoisonMessage,
    check_size,
    decode,
)
from llamaduo.contract.events import Event
from tests.chaos.poison import json_values

pytestmark = pytest.mark.scenario("input hardening")
SPEC = MigrationSpec.model_validate({"task": {"name": "t"}, "coverage": {"uri": "s3://bucket/c.jsonl"}})


def test_an_event_over_the_size_limit_is_poison_named_by_its_ce_subject(scenario) -> None:
    body = json.dumps({"migration_id": "m-1", "pad": "x" * MAX_EVENT_BYTES}).encode()
    with pytest.raises(PoisonMessage) as info:
        decode(body, MigrationRequested, {"ce-subject": "m-1"})
    assert info.value.reason == "oversized_event"
    assert str(len(body)) in info.value.detail and str(MAX_EVENT_BYTES) in info.value.detail
    assert info.value.migration_id == "m-1"
    scenario.fault("oversized event")


def test_a_service_refuses_to_publish_an_event_over_the_limit(scenario) -> None:
    event = MigrationRequested(migration_id="m-1", spec=SPEC)
    publisher = Publisher(js=None, source="test", settings=BusSettings(max_event_bytes=64))  # type: ignore[arg-type]
    with pytest.raises(EventTooLarge, match="over the 64-byte limit"):
        import asyncio

        asyncio.run(publisher.publish(event))
    assert check_size(b"{}", "x") == b"{}"
    scenario.fault("oversized output")


@pytest.mark.parametrize("bad_id", ["../../etc", "a b", "", "x" * 500, "bucket/../other"])
def test_poison_naming_an_unusable_migration_id_fails_no_migration(bad_id: str) -> None:
    """Else the worker's TaskFailed for it would itself be invalid and the message would never be terminated."""
    body = json.dumps({"migration_id": bad_id, "spec": 1}).encode()
    with pytest.raises(PoisonMessage) as info:
        decode(body, MigrationRequested, {"ce-subject": bad_id})
    assert info.value.reason == "schema_violation" and info.value.migration_id is None


def test_a_body_nested_too_deeply_is_invalid_json_not_a_crash() -> None:
    with pytest.raises(PoisonMessage) as info:
        decode(b"[" * 100_000 + b"]" * 100_000, MigrationRequested)
    assert info.value.reason == "invalid_json" and "nested too deeply" in info.value.detail


@settings(max_examples=300, derandomize=True, database=None, suppress_health_check=list(HealthCheck), deadline=None)
@given(
    st.sampled_from(ALL_EVENTS),
    st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
)
def test_decode_raises_only_poison_for_any_body(model: type[Event], body: bytes) -> None:
    try:
        decode(body, model)
    except PoisonMessage as poison:
        assert poison.reason and poison.detail
        assert poison.migration_id is None or isinstance(poison.migration_id, str)
