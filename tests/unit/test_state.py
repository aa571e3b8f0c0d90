"""The migration state in the KV bucket survives a rolling upgrade: fields a newer coordinator adds are ignored."""

from __future__ import annotations

import json

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
