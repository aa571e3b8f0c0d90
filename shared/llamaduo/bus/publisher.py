"""Publishing with a PubAck: CloudEvents headers, a deterministic Nats-Msg-Id, retries on timeouts."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping

from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck

from llamaduo.bus.provisioning import DEAD_LETTER_STREAM, EVENTS_STREAM
from llamaduo.bus.settings import BusSettings
from llamaduo.contract import Event, check_size, dead_letter_subject, encode, event_id, headers_for, subject_for

log = logging.getLogger(__name__)
_TRANSIENT = (NatsTimeoutError, NoRespondersError, asyncio.TimeoutError)


def _header_value(value: object, limit: int = 2000) -> str:
    """Header values are single-line: collapse newlines and bound the length."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Publisher:
    """Publishes events to the events stream and waits for the stream's acknowledgement."""

    def __init__(self, js: JetStreamContext, source: str, settings: BusSettings, attempts: int = 6) -> None:
        self.js = js
        self.source = source
        self.settings = settings
        self.attempts = attempts

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str], stream: str) -> PubAck:
        for attempt in range(self.attempts):
            try:
                return await self.js.publish(
                    subject, body, timeout=self.settings.publish_timeout_s, stream=stream, headers=headers
                )
            except _TRANSIENT as exc:
                if attempt + 1 == self.attempts:
                    raise
                delay = min(0.2 * 2**attempt, 5.0) * (0.5 + random.random())
                log.warning("publish retry", extra={"subject": subject, "error": repr(exc), "delay_s": delay})
                await asyncio.sleep(delay)
            except ConnectionClosedError:
                raise
        raise AssertionError("unreachable")

    async def publish(self, event: Event, *, ce_id: str | None = None) -> PubAck:
        """Publish `event` with its deterministic id (or `ce_id`); a duplicate within the window is dropped.

        An event over the size limit raises `EventTooLarge` before anything is sent.
        """
        ident = ce_id or event_id(event)
        body = check_size(encode(event), event.name, self.settings.max_event_bytes)
        headers = headers_for(event, ce_id=ident, source=self.source)
        ack = await self._publish(subject_for(event), body, headers, EVENTS_STREAM)
        log.debug("published", extra={"event": event.name, "event_id": ident, "duplicate": ack.duplicate})
        return ack

    async def dead_letter(
        self,
        service: str,
        *,
        body: bytes,
        headers: Mapping[str, str] | None,
        subject: str,
        reason: str,
        detail: str,
        event_id: str,
        delivery: int,
    ) -> PubAck:
        """Park a message that can never be processed, with why, on the service's dead-letter subject."""
        out = {k: v for k, v in (headers or {}).items() if k != "Nats-Msg-Id"}
        out.update(
            {
                "Nats-Msg-Id": f"dlq:{service}:{event_id}",
                "llamaduo-dlq-reason": _header_value(reason, 200),
                "llamaduo-dlq-detail": _header_value(detail),
                "llamaduo-dlq-subject": subject,
                "llamaduo-dlq-service": service,
                "llamaduo-dlq-event-id": _header_value(event_id, 500),
                "llamaduo-dlq-delivery": str(delivery),
            }
        )
        return await self._publish(dead_letter_subject(service), body, out, DEAD_LETTER_STREAM)
