"""The v1 contract: event bodies, the envelope, deterministic ids and precise poison reasons."""

import json

import pytest

from llamaduo.contract import (
    ALL_EVENTS,
    ArtifactRef,
    DatasetReady,
    MigrationCancel,
    MigrationRequested,
    MigrationSpec,
    PoisonMessage,
    decode,
    encode,
    event_id,
    headers_for,
    subject_for,
)

SPEC = MigrationSpec.model_validate({"task": {"name": "t"}, "coverage": {"uri": "file:///data/c.jsonl"}})
REF = ArtifactRef(uri="file:///x", sha256="0" * 64, size=1)


def test_every_event_has_a_versioned_subject():
    subjects = {subject_for(event) for event in ALL_EVENTS}
    assert len(subjects) == len(ALL_EVENTS) == 12
    assert all(s.startswith("llamaduo.v1.") for s in subjects)
    assert "llamaduo.v1.migration.need_more_data" in subjects


def test_round_trip_and_cloudevents_headers():
    event = DatasetReady(
        migration_id="m-001", iteration=2, spec=SPEC, dataset=REF, test=REF, train_rows=3, synthetic_rows=1
    )
    assert decode(encode(event), DatasetReady) == event
    headers = headers_for(event, ce_id=event_id(event), source="llamaduo/test")
    assert {"ce-id", "ce-source", "ce-type", "ce-specversion", "ce-time"} <= headers.keys()
    assert headers["ce-type"] == "io.llamaduo.v1.dataset.ready"
    assert headers["Nats-Msg-Id"] == headers["ce-id"] == "m-001:2:dataset.ready"


def test_event_ids_are_deterministic_and_distinct_per_iteration():
    a = DatasetReady(
        migration_id="m-001", iteration=0, spec=SPEC, dataset=REF, test=REF, train_rows=1, synthetic_rows=0
    )
    b = a.model_copy(update={"iteration": 1})
    assert event_id(a) == event_id(a.model_copy())
    assert event_id(a) != event_id(b)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\x00 not json", "invalid_json"),
        (b'{"migration_id": "m-001", "unexpected": 1}', "schema_violation"),
        (b'{"migration_id": "M!", "reason": "x"}', "schema_violation"),
        (b'{"schema_version": 7, "migration_id": "m-001"}', "unknown_schema_version"),
    ],
)
def test_poison_bodies_are_named(body, reason):
    with pytest.raises(PoisonMessage) as info:
        decode(body, MigrationCancel)
    assert info.value.reason == reason


def test_poison_keeps_the_migration_id_when_it_can():
    with pytest.raises(PoisonMessage) as info:
        decode(json.dumps({"migration_id": "m-001", "spec": {}}).encode(), MigrationRequested)
    assert info.value.migration_id == "m-001"
    assert "spec" in info.value.detail


def test_wrong_ce_type_header_is_poison():
    body = encode(MigrationCancel(migration_id="m-001"))
    with pytest.raises(PoisonMessage) as info:
        decode(body, MigrationCancel, {"ce-type": "io.llamaduo.v1.progress"})
    assert info.value.reason == "wrong_event_type"


def test_spec_rejects_bad_thresholds_and_doubles_volumes():
    with pytest.raises(ValueError, match="thresholds.similarity"):
        MigrationSpec.model_validate(
            {"task": {"name": "t"}, "coverage": {"uri": "x"}, "evaluation": {"thresholds": {"similarity": 150}}}
        )
    assert [SPEC.rows_for_round(i) for i in range(4)] == [64, 128, 256, 512]


def test_spec_never_carries_an_api_key():
    with pytest.raises(ValueError, match="api_key"):
        MigrationSpec.model_validate(
            {"task": {"name": "t"}, "coverage": {"uri": "x"}, "evaluation": {"judge": {"api_key": "sk-123"}}}
        )


def test_a_resumed_run_and_each_resume_request_get_their_own_ids():
    from llamaduo.contract import MigrationFailed, MigrationResume

    def dataset(spec):
        return DatasetReady(
            migration_id="mig-1", iteration=1, spec=spec, dataset=REF, test=REF, train_rows=3, synthetic_rows=1
        )

    first = event_id(dataset(SPEC))
    resumed = event_id(dataset(SPEC.model_copy(update={"resumed": 1})))
    assert first != resumed and resumed.endswith(":r1")
    assert event_id(MigrationFailed(migration_id="mig-1", reason="plateau")) != event_id(
        MigrationFailed(migration_id="mig-1", reason="plateau", resumed=1)
    )
    one, two = (MigrationResume(migration_id="mig-1", request_id=r) for r in ("a1", "b2"))
    assert event_id(one) != event_id(two)
    with pytest.raises(ValueError):
        MigrationResume(migration_id="mig-1", request_id="has spaces")
