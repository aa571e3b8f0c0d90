"""The one place where streams, consumers and the state bucket are declared; services only attach."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from llamaduo.bus.settings import BusSettings
from llamaduo.contract import (
    ALL_EVENTS,
    DatasetReady,
    EvaluationCompleted,
    MigrationCancel,
    MigrationRequested,
    MigrationResume,
    ModelTrained,
    NeedMoreData,
    ResponsesReady,
    TaskFailed,
    subject_for,
)
from llamaduo.contract.subjects import DEAD_LETTER_PREFIX

EVENTS_STREAM = "LLAMADUO_EVENTS"
DEAD_LETTER_STREAM = "LLAMADUO_DEADLETTER"
STATE_BUCKET = "llamaduo-migrations"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerDef:
    """A durable pull consumer shared by every replica of one service."""

    service: str
    durable: str
    subject: str


CONSUMERS: tuple[ConsumerDef, ...] = (
    ConsumerDef("coordinator", "coordinator-requested", subject_for(MigrationRequested)),
    ConsumerDef("coordinator", "coordinator-dataset", subject_for(DatasetReady)),
    ConsumerDef("coordinator", "coordinator-evaluated", subject_for(EvaluationCompleted)),
    ConsumerDef("coordinator", "coordinator-task-failed", subject_for(TaskFailed)),
    ConsumerDef("coordinator", "coordinator-cancel", subject_for(MigrationCancel)),
    ConsumerDef("coordinator", "coordinator-resume", subject_for(MigrationResume)),
    ConsumerDef("trainer", "trainer", subject_for(DatasetReady)),
    ConsumerDef("inferencer", "inferencer", subject_for(ModelTrained)),
    ConsumerDef("judge", "judge", subject_for(ResponsesReady)),
    ConsumerDef("synthesizer", "synthesizer", subject_for(NeedMoreData)),
)


def consumer(durable: str) -> ConsumerDef:
    """The consumer definition named `durable`."""
    for item in CONSUMERS:
        if item.durable == durable:
            return item
    raise KeyError(durable)


def events_stream_config(settings: BusSettings) -> StreamConfig:
    """Every v1 event, kept (limits retention) so observers can replay a migration without taking work."""
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=sorted(subject_for(event) for event in ALL_EVENTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=settings.stream_max_age_s,
        duplicate_window=settings.duplicate_window_s,
    )


def dead_letter_stream_config(settings: BusSettings) -> StreamConfig:
    """Poison messages with their reason, per service."""
    return StreamConfig(
        name=DEAD_LETTER_STREAM,
        subjects=[f"{DEAD_LETTER_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        max_age=settings.stream_max_age_s,
        duplicate_window=settings.duplicate_window_s,
    )


def consumer_config(item: ConsumerDef, settings: BusSettings) -> ConsumerConfig:
    """Explicit acks, bounded deliveries; retry delays come from the worker's own `nak(delay)`."""
    return ConsumerConfig(
        durable_name=item.durable,
        filter_subject=item.subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        # One more than the worker's own limit: the worker dead-letters on its last try, so the server
        # never silently drops a message at max_deliver.
        max_deliver=settings.max_deliver + 1,
        max_ack_pending=1000,
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("stream created", extra={"stream": config.name})
        return
    missing = set(config.subjects or []) - set(info.config.subjects or [])
    if missing:
        # New event types are added in place; nothing else about a live stream is changed from code.
        merged = StreamConfig.from_response(info.config.as_dict())
        merged.subjects = sorted(set(info.config.subjects or []) | missing)
        await js.update_stream(merged)
        log.info("stream subjects extended", extra={"stream": config.name, "added": sorted(missing)})


async def _ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    assert config.durable_name is not None
    try:
        await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, config)
        log.info("consumer created", extra={"consumer": config.durable_name})


async def provision(js: JetStreamContext, settings: BusSettings) -> None:
    """Create whatever is missing: both streams, every service's durable consumer, the state bucket."""
    await _ensure_stream(js, events_stream_config(settings))
    await _ensure_stream(js, dead_letter_stream_config(settings))
    for item in CONSUMERS:
        await _ensure_consumer(js, EVENTS_STREAM, consumer_config(item, settings))
    try:
        await js.key_value(STATE_BUCKET)
    except BucketNotFoundError:
        await js.create_key_value(
            KeyValueConfig(
                bucket=STATE_BUCKET,
                history=5,
                storage=StorageType.FILE,
                replicas=settings.stream_replicas,
                description="LlamaDuo migration state, owned by the coordinator",
            )
        )
        log.info("state bucket created", extra={"bucket": STATE_BUCKET})
