"""The CloudEvents NATS binding: `ce-*` headers around a JSON body, and deterministic event ids."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import ValidationError

from llamaduo.contract.artifacts import is_valid_migration_id
from llamaduo.contract.events import SCHEMA_VERSION, Event, IterationEvent
from llamaduo.contract.subjects import event_type

E = TypeVar("E", bound=Event)

SPEC_VERSION = "1.0"
MSG_ID_HEADER = "Nats-Msg-Id"
MAX_EVENT_BYTES = 256 * 1024
"""Largest event body accepted (and published): events carry references, never the data itself (claim check)."""


class PoisonMessage(Exception):
    """A message that can never be processed; it goes to the dead-letter subject with `reason`."""

    def __init__(self, reason: str, detail: str, migration_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.migration_id = migration_id


def event_id(event: Event, *parts: object) -> str:
    """Deterministic id of an event: the same logical event always gets the same id (JetStream dedups it)."""
    iteration = event.iteration if isinstance(event, IterationEvent) else getattr(event, "iteration", None)
    pieces = [event.migration_id, "-" if iteration is None else str(iteration), event.name, *map(str, parts)]
    # After a resume the same stages run again: their events must not be taken for duplicates of the first run's.
    spec = getattr(event, "spec", None)
    resumed = getattr(spec, "resumed", 0) or getattr(event, "resumed", 0)
    if resumed:
        pieces.append(f"r{resumed}")
    request_id = getattr(event, "request_id", None)
    if request_id:
        pieces.append(str(request_id))
    return ":".join(pieces)


def headers_for(event: Event, *, ce_id: str, source: str, now: datetime | None = None) -> dict[str, str]:
    """CloudEvents binary-mode headers plus the JetStream dedup id."""
    moment = (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    return {
        "ce-specversion": SPEC_VERSION,
        "ce-id": ce_id,
        "ce-source": source,
        "ce-type": event_type(event),
        "ce-time": moment,
        "ce-subject": event.migration_id,
        "ce-dataschema": f"llamaduo/schemas/{event.name}.json",
        "content-type": "application/json",
        MSG_ID_HEADER: ce_id,
    }


def encode(event: Event) -> bytes:
    """The JSON body of an event."""
    return event.model_dump_json().encode()


class EventTooLarge(ValueError):
    """An event body over the size limit, refused before it is published."""


def check_size(body: bytes, name: str, max_bytes: int = MAX_EVENT_BYTES) -> bytes:
    """`body` when it is within `max_bytes`; `EventTooLarge` naming the event and both sizes otherwise."""
    if len(body) > max_bytes:
        raise EventTooLarge(
            f"{name} event body is {len(body)} bytes, over the {max_bytes}-byte limit: large data belongs in the "
            "artifact store, referenced by URI and sha256"
        )
    return body


def _header_migration_id(headers: Mapping[str, str] | None) -> str | None:
    """The migration an unreadable body belongs to, from its CloudEvents `ce-subject` header (if well-formed)."""
    value = (headers or {}).get("ce-subject")
    return value if isinstance(value, str) and is_valid_migration_id(value) else None


def decode(
    body: bytes, model: type[E], headers: Mapping[str, str] | None = None, *, max_bytes: int = MAX_EVENT_BYTES
) -> E:
    """Parse and validate a body, raising `PoisonMessage` with a precise reason when it cannot be used.

    A body over `max_bytes` is refused unparsed (`oversized_event`); its migration comes from `ce-subject`.
    """
    if len(body) > max_bytes:
        raise PoisonMessage(
            "oversized_event",
            f"body is {len(body)} bytes, over the {max_bytes}-byte event limit",
            _header_migration_id(headers),
        )
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise PoisonMessage("invalid_json", f"body is not JSON: {problem}", _header_migration_id(headers)) from exc
    migration_id = raw.get("migration_id") if isinstance(raw, dict) else None
    if not isinstance(migration_id, str) or not is_valid_migration_id(migration_id):
        migration_id = None
    if isinstance(raw, dict) and raw.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise PoisonMessage(
            "unknown_schema_version",
            f"schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}",
            migration_id,
        )
    if headers and headers.get("ce-type") not in (None, event_type(model)):
        raise PoisonMessage(
            "wrong_event_type", f"ce-type {headers.get('ce-type')!r}, expected {event_type(model)!r}", migration_id
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<body>'}: {err['msg']}" for err in exc.errors()[:5])
        raise PoisonMessage("schema_violation", f"not a valid {model.name}: {problems}", migration_id) from exc
