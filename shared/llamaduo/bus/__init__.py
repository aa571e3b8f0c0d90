"""The bus: provisioning, idempotent publishing, the task runtime, migration state in KV."""

from llamaduo.bus.kv import StateConflict, StateStore
from llamaduo.bus.provisioning import (
    CONSUMERS,
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    STATE_BUCKET,
    ConsumerDef,
    provision,
)
from llamaduo.bus.publisher import Publisher
from llamaduo.bus.service import Binding, build_app, provision_bus, run_app, run_service
from llamaduo.bus.settings import BusSettings
from llamaduo.bus.worker import TaskContext, TaskError, Worker

__all__ = [
    "CONSUMERS",
    "DEAD_LETTER_STREAM",
    "EVENTS_STREAM",
    "STATE_BUCKET",
    "Binding",
    "BusSettings",
    "ConsumerDef",
    "Publisher",
    "StateConflict",
    "StateStore",
    "TaskContext",
    "TaskError",
    "Worker",
    "build_app",
    "provision",
    "provision_bus",
    "run_app",
    "run_service",
]
