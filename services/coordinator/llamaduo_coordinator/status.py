"""The coordinator's status endpoint: core NATS request/reply on `llamaduo.v1.status`, shared by every replica.

A request is a JSON object. `{"migration_id": "<id>"}` is answered with the migration's state (the KV record,
as JSON) plus the live progress this replica has heard of:

    {...MigrationState..., "progress": [StageProgress...], "eta_s": 12.5 | null,
     "source": "coordinator", "replied_at": "<ISO time>"}

`{}` or `{"migration_id": null}` lists every migration:

    {"migrations": [MigrationSummary...], "truncated": false, "source": "coordinator", "replied_at": "<ISO time>"}

Anything else gets `{"error": "<why>", "code": "bad_request" | "unknown_migration" | "unavailable" | "too_large"}`
and the endpoint goes on answering. Progress comes from a plain core subscription to the progress subject (no
durable: it is advisory and lives only in this replica's memory), so every replica of the queue group sees all of
it; ended migrations are forgotten a while after their terminal event.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llamaduo.bus import STATE_BUCKET, StateStore
from llamaduo.client import MigrationSummary, ProgressTracker, migration_eta
from llamaduo.contract import MigrationFailed, MigrationGraduated, PoisonMessage, Progress, decode, subject_for
from llamaduo.contract.subjects import STATUS_SUBJECT
from llamaduo.state import utcnow
from llamaduo.telemetry import get_logger

STATUS_QUEUE = "coordinator"
"""Queue group of the status subscription: one replica answers each request."""
MAX_LISTED = 2000
"""The list reply carries at most this many migrations (the most recently updated), to stay under max_payload."""
MAX_REQUEST_BYTES = 4096
PRUNE_EVERY_S = 30.0

log = get_logger(__name__)


class BadRequest(ValueError):
    """A status request that cannot be answered as asked."""


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": message, "code": code}


def parse_request(body: bytes) -> str | None:
    """The migration id asked about, or None for the list; raises `BadRequest` for anything malformed."""
    if len(body) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request of {len(body)} bytes; the limit is {MAX_REQUEST_BYTES}")
    if not body.strip():
        return None
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadRequest(f'request must be a JSON object like {{"migration_id": "..."}}, not {type(raw).__name__}')
    migration_id = raw.get("migration_id")
    if migration_id is not None and (not isinstance(migration_id, str) or not migration_id):
        raise BadRequest("migration_id must be a non-empty string or null")
    return migration_id


class StatusService:
    """Answers status requests from the KV state and the progress this replica heard of."""

    def __init__(
        self,
        jetstream: Callable[[], JetStreamContext],
        tracker: ProgressTracker | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._jetstream = jetstream
        self.tracker = tracker or ProgressTracker()
        self.clock = clock
        self._states: StateStore | None = None
        self._last_prune: datetime | None = None

    async def states(self) -> StateStore:
        """The migration-state bucket (opened once)."""
        if self._states is None:
            self._states = StateStore(await self._jetstream().key_value(STATE_BUCKET))
        return self._states

    # progress and terminal events ------------------------------------------------------------------------
    def on_progress(self, body: bytes) -> None:
        """Remember a progress event; a malformed one is ignored (progress is advisory)."""
        try:
            event = decode(body, Progress)
        except PoisonMessage as exc:
            log.debug("progress ignored", extra={"reason": exc.reason, "detail": exc.detail})
            return
        now = self.clock()
        self.tracker.observe(event, now)
        if self._last_prune is None or (now - self._last_prune).total_seconds() >= PRUNE_EVERY_S:
            self._last_prune = now
            forgotten = self.tracker.prune(now)
            if forgotten:
                log.debug("progress forgotten", extra={"migrations": forgotten})

    def on_ended(self, migration_id: str | None) -> None:
        """A migration graduated or failed: its progress is forgotten a while from now."""
        if migration_id:
            self.tracker.ended(migration_id, self.clock())

    # requests ------------------------------------------------------------------------------------------------
    async def answer(self, body: bytes) -> dict[str, Any]:
        """The reply to one request; never raises."""
        try:
            migration_id = parse_request(body)
        except BadRequest as exc:
            log.info("bad status request", extra={"error": str(exc)})
            return _error("bad_request", str(exc))
        try:
            if migration_id is None:
                return await self._list()
            return await self._one(migration_id)
        except Exception as exc:  # the KV is unreachable or a record is unreadable: say so, keep serving
            log.warning("status request failed", extra={"migration_id": migration_id, "error": repr(exc)})
            return _error("unavailable", f"could not read migration state: {exc}")

    async def _one(self, migration_id: str) -> dict[str, Any]:
        found = await (await self.states()).get(migration_id)
        if found is None:
            return _error("unknown_migration", f"unknown migration {migration_id!r}")
        state = found[0]
        now = self.clock()
        progress = self.tracker.snapshot(migration_id)
        reply: dict[str, Any] = state.model_dump(mode="json")
        reply["progress"] = [entry.model_dump(mode="json") for entry in progress]
        reply["eta_s"] = migration_eta(state, progress, now)
        reply["source"] = "coordinator"
        reply["replied_at"] = now.isoformat()
        return reply

    async def _list(self) -> dict[str, Any]:
        states = await (await self.states()).list()
        newest = sorted(states, key=lambda state: state.updated_at)[-MAX_LISTED:]
        return {
            "migrations": [
                MigrationSummary.of(state).model_dump(mode="json")
                for state in sorted(newest, key=lambda state: state.created_at)
            ],
            "truncated": len(states) > len(newest),
            "source": "coordinator",
            "replied_at": self.clock().isoformat(),
        }

    async def respond(self, msg: Msg, max_payload: int) -> None:
        """Answer a request message (requests without a reply subject are dropped)."""
        if not msg.reply:
            log.debug("status request without a reply subject dropped")
            return
        reply = await self.answer(msg.data)
        data = json.dumps(reply, default=str).encode()
        if len(data) > max_payload:
            data = json.dumps(_error("too_large", f"reply of {len(data)} bytes exceeds max_payload")).encode()
        await msg.respond(data)

    # wiring -------------------------------------------------------------------------------------------------
    def attach(self, broker: NatsBroker) -> None:
        """Add the status, progress and terminal-event subscribers to the coordinator's broker."""

        def max_payload() -> int:
            return int(getattr(broker.connection, "max_payload", 0) or 1024 * 1024)

        async def coordinator_status(msg: NatsMessage) -> None:
            try:
                await self.respond(msg.raw_message, max_payload())
            except Exception as exc:  # a reply that cannot be sent (the requester left) must not stop the endpoint
                log.warning("status reply not sent", extra={"error": repr(exc)})

        async def coordinator_progress(msg: NatsMessage) -> None:
            self.on_progress(msg.raw_message.data)

        async def coordinator_graduated(msg: NatsMessage) -> None:
            self.on_ended((msg.raw_message.headers or {}).get("ce-subject"))

        async def coordinator_failed(msg: NatsMessage) -> None:
            self.on_ended((msg.raw_message.headers or {}).get("ce-subject"))

        handlers: list[tuple[str, str, Callable[[NatsMessage], Awaitable[None]]]] = [
            (STATUS_SUBJECT, STATUS_QUEUE, coordinator_status),
            (subject_for(Progress), "", coordinator_progress),
            (subject_for(MigrationGraduated), "", coordinator_graduated),
            (subject_for(MigrationFailed), "", coordinator_failed),
        ]
        for subject, queue, handler in handlers:
            broker.subscriber(subject, queue=queue, no_reply=True)(handler)
