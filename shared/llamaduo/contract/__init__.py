"""The v1 contract: the migration spec, artifact references, event bodies, subjects and the envelope."""

from llamaduo.contract.artifacts import ArtifactRef, is_valid_migration_id
from llamaduo.contract.envelope import PoisonMessage, decode, encode, event_id, headers_for
from llamaduo.contract.events import (
    ALL_EVENTS,
    EVENTS_BY_NAME,
    Agreement,
    DatasetReady,
    EvaluationCompleted,
    Event,
    IterationEvent,
    MetricSummary,
    MigrationCancel,
    MigrationFailed,
    MigrationGraduated,
    MigrationRequested,
    MigrationResume,
    ModelTrained,
    NeedMoreData,
    Progress,
    ResponsesReady,
    Spend,
    TaskFailed,
)
from llamaduo.contract.spec import MigrationSpec
from llamaduo.contract.subjects import dead_letter_subject, subject_for

__all__ = [
    "ALL_EVENTS",
    "EVENTS_BY_NAME",
    "Agreement",
    "ArtifactRef",
    "DatasetReady",
    "EvaluationCompleted",
    "Event",
    "IterationEvent",
    "MetricSummary",
    "MigrationCancel",
    "MigrationFailed",
    "MigrationGraduated",
    "MigrationRequested",
    "MigrationResume",
    "MigrationSpec",
    "ModelTrained",
    "NeedMoreData",
    "PoisonMessage",
    "Progress",
    "ResponsesReady",
    "Spend",
    "TaskFailed",
    "dead_letter_subject",
    "decode",
    "encode",
    "event_id",
    "headers_for",
    "is_valid_migration_id",
    "subject_for",
]
