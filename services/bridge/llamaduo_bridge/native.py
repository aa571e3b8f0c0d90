"""CloudEvents attributes in each bus's native headers (the protocol bindings), both ways.

| bus | attribute `id` is carried as | content type |
| --- | --- | --- |
| Kafka | header `ce_id` (Kafka protocol binding) | header `content-type` |
| RabbitMQ | application property `cloudEvents_id` (AMQP binding; `cloudEvents:id` accepted too) | AMQP `content_type` |
| MQTT 5 | user property `id` (MQTT binding: the bare attribute name) | MQTT 5 content type |
| Redis Streams | field `ce_id` beside the `data` field (no official binding; Kafka's naming) | field `content-type` |

Reading is lenient: any of `ce_`, `ce-`, `cloudEvents_`, `cloudEvents:` prefixes is accepted on every bus, and bare
names on MQTT, so a producer that already speaks another binding is understood.
"""

from __future__ import annotations

from collections.abc import Mapping

from llamaduo_bridge.cloudevents import ATTRIBUTES
from llamaduo_bridge.settings import Bus

_PREFIXES = ("ce_", "ce-", "cloudevents_", "cloudevents:")
CONTENT_TYPE_KEY: dict[Bus, str] = {"kafka": "content-type", "redis": "content-type"}
ERROR_REASON = "llamaduo-error-reason"
ERROR_DETAIL = "llamaduo-error-detail"


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes | bytearray) else str(value)


def read_attributes(bus: Bus, headers: Mapping[str, object] | None) -> dict[str, str]:
    """The CloudEvents attributes found in a message's native headers."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        name = _text(key)
        lower = name.lower()
        for prefix in _PREFIXES:
            if lower.startswith(prefix) and lower[len(prefix) :] in ATTRIBUTES:
                out[lower[len(prefix) :]] = _text(value)
                break
        else:
            if bus == "mqtt" and lower in ATTRIBUTES:
                out[lower] = _text(value)
    return out


def write_attributes(bus: Bus, attributes: Mapping[str, str]) -> dict[str, str]:
    """Native headers for `attributes` (without the content type, which each bus carries in its own slot)."""
    prefix = {"kafka": "ce_", "redis": "ce_", "rabbitmq": "cloudEvents_", "mqtt": ""}[bus]
    return {f"{prefix}{key}": value for key, value in attributes.items() if key != "datacontenttype"}


def error_headers(reason: str, detail: str, limit: int = 2000) -> dict[str, str]:
    """Why a message was dead-lettered, as single-line header values."""
    text = " ".join(detail.split())
    return {ERROR_REASON: reason, ERROR_DETAIL: text if len(text) <= limit else text[: limit - 1] + "…"}
