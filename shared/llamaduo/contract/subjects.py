"""Subject names: every event travels on `llamaduo.v1.<event name>`."""

from __future__ import annotations

from llamaduo.contract.events import Event

PREFIX = "llamaduo.v1"
DEAD_LETTER_PREFIX = f"{PREFIX}.deadletter"
STATUS_SUBJECT = f"{PREFIX}.status"
"""Core NATS request/reply (not an event, not in any stream): the coordinator answers status requests here."""


def subject_for(event: type[Event] | Event) -> str:
    """The subject an event is published on."""
    return f"{PREFIX}.{event.name}"


def dead_letter_subject(service: str) -> str:
    """The dead-letter subject of one service's consumer."""
    return f"{DEAD_LETTER_PREFIX}.{service}"


def event_type(event: type[Event] | Event) -> str:
    """The CloudEvents `type` attribute of an event."""
    return f"io.llamaduo.v1.{event.name}"
