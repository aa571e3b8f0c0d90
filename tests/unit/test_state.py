"""The migration state in the KV bucket survives a rolling upgrade: fields a newer coordinator adds are ignored."""

from __future__ import annotations

import json

from llamaduo.bus.kv import StateStore
from llamaduo.contract import MigrationSpec
from llamaduo.state import MigrationState


def test_a_state_written_by_a_newer_coordinator_still_parses() -> None:
    spec = MigrationSpec.model_validate({"task": {"name": "t"}, "coverage": {"uri": "s3://bucket/coverage.jsonl"}})
    raw = json.loads(MigrationState(migration_id="m", spec=spec, status="running").model_dump_json())
    raw["field_from_the_future"] = {"anything": 1}
    state = MigrationState.model_validate_json(json.dumps(raw))
    assert state.status == "running" and state.migration_id == "m"
    assert not state.model_dump().get("field_from_the_future")


def test_the_decision_published_flag_defaults_to_false_for_states_written_before_it_existed() -> None:
    spec = MigrationSpec.model_validate({"task": {"name": "t"}, "coverage": {"uri": "s3://bucket/coverage.jsonl"}})
    record = {
        "iteration": 0,
        "dataset": {"uri": "s3://bucket/d.jsonl", "sha256": "0" * 64, "size": 1},
        "train_rows": 1,
        "synthetic_rows": 0,
        "decision": "need_more_data",
    }
    raw = json.loads(MigrationState(migration_id="m", spec=spec).model_dump_json())
    raw["iterations"] = [record]
    state = MigrationState.model_validate(raw)
    assert state.iterations[0].decision == "need_more_data" and not state.iterations[0].decision_published


class NoKeysError(Exception):
    """nats-py's error for a bucket its watcher saw as empty (matched by name, as StateStore does)."""


class RacyBucket:
    """A bucket whose `keys()` first reports it empty although its stream holds the state (nats-py's watcher race)."""

    def __init__(self, state: MigrationState, misses: int) -> None:
        self.state, self.misses, self.calls = state, misses, 0

    async def keys(self) -> list[str]:
        self.calls += 1
        if self.calls <= self.misses:
            raise NoKeysError
        return [self.state.migration_id]

    async def status(self) -> object:
        return type("Status", (), {"values": 1})()

    async def get(self, key: str) -> object:
        return type("Entry", (), {"value": self.state.model_dump_json().encode(), "revision": 1})()


async def test_listing_asks_again_when_the_watcher_reports_a_bucket_with_messages_empty() -> None:
    spec = MigrationSpec.model_validate({"task": {"name": "t"}, "coverage": {"uri": "s3://bucket/coverage.jsonl"}})
    bucket = RacyBucket(MigrationState(migration_id="m", spec=spec), misses=2)
    states = await StateStore(bucket).list()  # type: ignore[arg-type]
    assert [s.migration_id for s in states] == ["m"] and bucket.calls == 3
