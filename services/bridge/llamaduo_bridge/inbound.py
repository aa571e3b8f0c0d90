"""One inbound message, whatever the bus: validate, publish on NATS with the same id, or dead-letter with the reason.

The caller (a bus adapter) acknowledges the external message only after this returns; if it raises `Stopping`
the message stays unacknowledged and the external bus redelivers it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from llamaduo.contract import encode, subject_for
from llamaduo_bridge.cloudevents import InvalidMessage, parse_inbound
from llamaduo_bridge.nats_link import NatsLink
from llamaduo_bridge.settings import BridgeSettings

log = logging.getLogger(__name__)
Outcome = Literal["published", "duplicate", "dead_lettered"]
DeadLetter = Callable[[InvalidMessage], Awaitable[None]]
"""Puts the current external message on the bus's dead-letter path with the error; returns once it is safe."""


@dataclass
class Counters:
    """What the bridge did with inbound messages since it started."""

    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class InboundHandler:
    """Turns external messages into v1 events on NATS."""

    def __init__(self, settings: BridgeSettings, link: NatsLink) -> None:
        self.settings = settings
        self.link = link
        self.counters = Counters()

    async def handle(
        self,
        body: bytes,
        attributes: Mapping[str, str],
        content_type: str | None,
        dead_letter: DeadLetter,
        origin: Mapping[str, object],
        problem: InvalidMessage | None = None,
    ) -> Outcome:
        """Publish the message on NATS (waiting for the PubAck) or dead-letter it; `origin` says where it came from.

        `problem` is what the adapter already found wrong with the message (e.g. a Redis entry without `data`).
        """
        try:
            if problem is not None:
                raise problem
            inbound = parse_inbound(body, attributes, content_type, self.settings.source)
        except InvalidMessage as exc:
            await dead_letter(exc)
            self.counters.dead_lettered += 1
            self.counters.by_reason[exc.reason] = self.counters.by_reason.get(exc.reason, 0) + 1
            log.error(
                "invalid inbound message dead-lettered",
                extra={
                    **origin,
                    "migration_id": exc.migration_id,
                    "event_id": attributes.get("id"),
                    "reason": exc.reason,
                    "detail": exc.detail,
                    "dead_lettered_total": self.counters.dead_lettered,
                },
            )
            return "dead_lettered"
        event = inbound.event
        ack = await self.link.publish(subject_for(event), encode(event), inbound.nats_headers(), event_id=inbound.ce_id)
        context = {
            **origin,
            "migration_id": event.migration_id,
            "event_id": inbound.ce_id,
            "event": event.name,
            "mode": inbound.mode,
            "id_derived": inbound.id_derived,
            "stream_seq": ack.seq,
        }
        if ack.duplicate:
            self.counters.duplicates += 1
            log.info("duplicate dropped by JetStream (redelivery)", extra=context)
            return "duplicate"
        self.counters.published += 1
        log.info("published on NATS", extra=context)
        return "published"
