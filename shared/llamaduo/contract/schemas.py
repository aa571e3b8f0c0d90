"""The public contract as files: a JSON Schema per event and an AsyncAPI 3 document (`make schemas`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic.json_schema import models_json_schema

from llamaduo.contract.events import ALL_EVENTS, Event
from llamaduo.contract.spec import MigrationSpec
from llamaduo.contract.subjects import DEAD_LETTER_PREFIX, event_type, subject_for

# Which service receives and which sends each event: the operations of the AsyncAPI document.
RECEIVES: dict[str, tuple[str, ...]] = {
    "coordinator": (
        "migration.requested",
        "dataset.ready",
        "evaluation.completed",
        "task.failed",
        "migration.cancel",
    ),
    "trainer": ("dataset.ready",),
    "inferencer": ("model.trained",),
    "judge": ("responses.ready",),
    "synthesizer": ("migration.need_more_data",),
}
SENDS: dict[str, tuple[str, ...]] = {
    "client": ("migration.requested", "migration.cancel"),
    "coordinator": ("dataset.ready", "migration.need_more_data", "migration.graduated", "migration.failed"),
    "trainer": ("model.trained", "progress", "task.failed"),
    "inferencer": ("responses.ready", "progress", "task.failed"),
    "judge": ("evaluation.completed", "progress", "task.failed"),
    "synthesizer": ("dataset.ready", "progress", "task.failed"),
}

CLOUDEVENT_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvents NATS binding (binary mode) plus the JetStream dedup id, on every message.",
    "properties": {
        "ce-specversion": {"type": "string", "const": "1.0"},
        "ce-id": {"type": "string", "description": "Deterministic event id; equal to Nats-Msg-Id."},
        "ce-source": {"type": "string", "description": "llamaduo/<service>"},
        "ce-type": {"type": "string", "description": "io.llamaduo.v1.<event name>"},
        "ce-time": {"type": "string", "format": "date-time"},
        "ce-subject": {"type": "string", "description": "The migration id."},
        "ce-dataschema": {"type": "string"},
        "content-type": {"type": "string", "const": "application/json"},
        "Nats-Msg-Id": {"type": "string"},
    },
    "required": ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "Nats-Msg-Id"],
}


def _title(event: type[Event]) -> str:
    return event.__name__


def event_schema(event: type[Event]) -> dict[str, Any]:
    """The standalone JSON Schema of one event body."""
    schema = event.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"llamaduo/schemas/{event.name}.json"
    schema["x-subject"] = subject_for(event)
    schema["x-ce-type"] = event_type(event)
    return schema


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the v1 bus."""
    _, defs = models_json_schema(
        [(event, "serialization") for event in ALL_EVENTS], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = dict(sorted(defs.get("$defs", {}).items()))
    schemas["CloudEventHeaders"] = CLOUDEVENT_HEADERS
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event in ALL_EVENTS:
        channel = event.name.replace(".", "_")
        messages[_title(event)] = {
            "name": event.name,
            "title": _title(event),
            "summary": (event.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/CloudEventHeaders"},
            "payload": {"$ref": f"#/components/schemas/{_title(event)}"},
        }
        channels[channel] = {
            "address": subject_for(event),
            "messages": {_title(event): {"$ref": f"#/components/messages/{_title(event)}"}},
        }
    channels["deadletter"] = {
        "address": f"{DEAD_LETTER_PREFIX}.{{service}}",
        "description": "Poison messages, unchanged, with llamaduo-dlq-reason / -detail / -subject headers.",
        "parameters": {"service": {"description": "The service that gave up on the message."}},
    }
    by_name = {event.name: event for event in ALL_EVENTS}
    operations: dict[str, Any] = {}
    for action, table in (("receive", RECEIVES), ("send", SENDS)):
        for service, names in table.items():
            for name in names:
                channel = name.replace(".", "_")
                operations[f"{service}_{action}_{channel}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{channel}"},
                    "messages": [{"$ref": f"#/channels/{channel}/messages/{_title(by_name[name])}"}],
                }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "LlamaDuo events",
            "version": "1.0.0",
            "description": "The v1 event contract of LlamaDuo's services on NATS JetStream. Generated: do not edit.",
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "Embedded default."}},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def rendered() -> dict[str, str]:
    """Every file of `schemas/`, by name, as text."""
    files = {
        f"{event.name}.json": json.dumps(event_schema(event), indent=2, sort_keys=True) + "\n" for event in ALL_EVENTS
    }
    spec = MigrationSpec.model_json_schema()
    spec["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    files["migration-spec.json"] = json.dumps(spec, indent=2, sort_keys=True) + "\n"
    files["asyncapi.yaml"] = yaml.safe_dump(asyncapi_document(), sort_keys=False, width=120)
    return files


def write_schemas(out: Path) -> list[Path]:
    """Write every schema file into `out` and remove stale ones; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    files = rendered()
    for stale in out.glob("*"):
        if stale.is_file() and stale.name not in files and stale.suffix in (".json", ".yaml"):
            stale.unlink()
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written
