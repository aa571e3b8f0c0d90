"""Bus-neutral CloudEvents handling: an external message in (structured or binary mode), a v1 event out, and back.

Inbound, a message is either *structured* (the body is a JSON CloudEvent with `specversion`, `id`, `type`, `data`,
content type `application/cloudevents+json` or a JSON object carrying `specversion`) or *binary* (the CloudEvents
attributes in the bus's native headers, the event body as the message body). Either way the data must validate as
`MigrationRequested` or `MigrationCancel`; the CloudEvents `id` becomes the JetStream `Nats-Msg-Id`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from llamaduo.contract import MigrationCancel, MigrationRequested, PoisonMessage, decode, event_id, headers_for
from llamaduo.contract.subjects import PREFIX, event_type

ATTRIBUTES = ("specversion", "id", "source", "type", "time", "subject", "dataschema", "datacontenttype")
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
INBOUND_MODELS: dict[str, type[MigrationRequested] | type[MigrationCancel]] = {
    event_type(MigrationRequested): MigrationRequested,
    event_type(MigrationCancel): MigrationCancel,
}
_ID = re.compile(r"^[\x21-\x7e]{1,256}$")


class InvalidMessage(Exception):
    """An external message the bridge can never publish; it goes to the bus's dead-letter path with the reason."""

    def __init__(self, reason: str, detail: str, migration_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.migration_id = migration_id


@dataclass(frozen=True)
class Inbound:
    """A validated request or cancel, with the CloudEvents attributes it goes to NATS with."""

    event: MigrationRequested | MigrationCancel
    ce_id: str
    source: str
    time: str | None
    mode: Literal["structured", "binary"]
    id_derived: bool

    def nats_headers(self) -> dict[str, str]:
        """The CloudEvents NATS binding headers plus `Nats-Msg-Id` = the CloudEvents id (JetStream dedup)."""
        headers = headers_for(self.event, ce_id=self.ce_id, source=self.source)
        if self.time:
            headers["ce-time"] = self.time
        return headers


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes | bytearray) else str(value)


def _structured(body: bytes) -> tuple[dict[str, str], bytes]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMessage("invalid_json", f"structured CloudEvent is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidMessage("invalid_cloudevent", "a structured CloudEvent must be a JSON object")
    attributes = {key: _text(document[key]) for key in ATTRIBUTES if document.get(key) is not None}
    if "data_base64" in document:
        try:
            return attributes, base64.b64decode(str(document["data_base64"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidMessage("invalid_cloudevent", f"data_base64 is not base64: {exc}") from exc
    if "data" not in document:
        raise InvalidMessage("invalid_cloudevent", "structured CloudEvent has neither `data` nor `data_base64`")
    data = document["data"]
    return attributes, (data.encode() if isinstance(data, str) else json.dumps(data).encode())


def is_structured(body: bytes, attributes: Mapping[str, str], content_type: str | None) -> bool:
    """Structured mode: the CloudEvents JSON content type, or no attributes in headers and `specversion` in the body."""
    if content_type and content_type.split(";")[0].strip().lower() == STRUCTURED_CONTENT_TYPE:
        return True
    if any(key in attributes for key in ("specversion", "id", "type")):
        return False
    head = body.lstrip()[:1]
    if head != b"{":
        return False
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(document, dict) and "specversion" in document


def parse_inbound(body: bytes, attributes: Mapping[str, str], content_type: str | None, default_source: str) -> Inbound:
    """Validate an external message as a v1 request or cancel; raise `InvalidMessage` naming the problem."""
    mode: Literal["structured", "binary"] = "binary"
    attrs = dict(attributes)
    data = body
    if is_structured(body, attributes, content_type):
        mode = "structured"
        attrs, data = _structured(body)
    version = attrs.get("specversion")
    if mode == "structured" and version is None:
        raise InvalidMessage("invalid_cloudevent", "structured CloudEvent without `specversion`")
    if version is not None and version != "1.0":
        raise InvalidMessage("unsupported_specversion", f"specversion {version!r}, expected '1.0'")
    kind = attrs.get("type") or event_type(MigrationRequested)
    model = INBOUND_MODELS.get(kind)
    if model is None:
        raise InvalidMessage("unsupported_type", f"type {kind!r}; the bridge accepts {sorted(INBOUND_MODELS)}")
    try:
        event = decode(data, model)
    except PoisonMessage as exc:
        raise InvalidMessage(exc.reason, exc.detail, exc.migration_id) from exc
    given = attrs.get("id")
    if given is not None and not _ID.match(given):
        raise InvalidMessage(
            "invalid_id", f"CloudEvents id {given[:80]!r} must be 1-256 printable ASCII characters without spaces"
        )
    when = attrs.get("time")
    if when is not None:
        try:
            datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidMessage(
                "invalid_time", f"time {when[:80]!r} is not RFC 3339: {exc}", event.migration_id
            ) from exc
    return Inbound(
        event=event,
        ce_id=given or event_id(event),
        source=attrs.get("source") or default_source,
        time=when,
        mode=mode,
        id_derived=given is None,
    )


def event_name_of(subject: str) -> str:
    """`llamaduo.v1.migration.graduated` -> `migration.graduated`."""
    return subject.removeprefix(PREFIX + ".")


def attributes_from_nats(headers: Mapping[str, str] | None) -> dict[str, str]:
    """CloudEvents attributes of an event on NATS (`ce-*` headers, `content-type` as `datacontenttype`)."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        lower = key.lower()
        if lower.startswith("ce-") and lower[3:] in ATTRIBUTES:
            out[lower[3:]] = value
        elif lower == "content-type":
            out["datacontenttype"] = value
    return out
