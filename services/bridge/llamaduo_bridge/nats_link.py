"""The NATS side: publish inbound events until JetStream accepts them, and pull chosen events to send out.

A NATS outage never drops a message: `publish` keeps retrying (the external message stays unacknowledged, and
because each bus consumer takes one message at a time the bridge takes no new ones) until the PubAck comes back
or the bridge stops, in which case the external bus keeps the message for redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import APIError, NotFoundError

from llamaduo.bus.provisioning import EVENTS_STREAM
from llamaduo.contract.subjects import PREFIX
from llamaduo_bridge.cloudevents import attributes_from_nats, event_name_of
from llamaduo_bridge.settings import BridgeSettings

log = logging.getLogger(__name__)
_TRANSIENT = (NatsError, APIError, asyncio.TimeoutError, OSError)

Deliver = Callable[[bytes, dict[str, str], str], Awaitable[None]]
"""Sends one event out on the external bus: (body, CloudEvents attributes, event name); returns once it is safe."""


class Stopping(Exception):
    """The bridge is shutting down while a message waited for NATS: leave it unacknowledged on the external bus."""


def _backoff(attempt: int, cap: float) -> float:
    return float(min(0.1 * 2**attempt, cap) * (0.5 + random.random() / 2))


class NatsLink:
    """One NATS connection (reconnecting forever), the inbound publisher and the outbound forwarder."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self.forwarded = 0
        """Events the external bus accepted since start."""
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._forwarder: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Connect (retrying until NATS is reachable); later outages are ridden out by reconnecting forever."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats error", extra={"error": repr(exc)})

        attempt = 0
        while True:
            try:
                self.nc = await nats.connect(
                    **self.settings.connect_options(),  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    connect_timeout=2,
                    error_cb=on_error,
                )
                break
            except (TimeoutError, NatsError, OSError) as exc:
                if self.stopping.is_set():
                    raise Stopping("connect") from exc
                delay = _backoff(attempt, self.settings.bridge_retry_max_s)
                attempt += 1
                log.warning("nats unreachable; retrying", extra={"error": repr(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
        self.js = self.nc.jetstream()

    async def publish(self, subject: str, body: bytes, headers: dict[str, str], *, event_id: str) -> PubAck:
        """Publish to the events stream and return its PubAck, retrying through outages until the bridge stops."""
        assert self.js is not None, "connect() first"
        attempt = 0
        while True:
            if self.stopping.is_set():
                raise Stopping(event_id)
            try:
                return await self.js.publish(
                    subject, body, timeout=self.settings.publish_timeout_s, stream=EVENTS_STREAM, headers=headers
                )
            except _TRANSIENT as exc:
                delay = _backoff(attempt, self.settings.bridge_retry_max_s)
                log.warning(
                    "nats publish failed; holding the message (not acknowledged on the external bus)",
                    extra={"event_id": event_id, "error": repr(exc), "attempt": attempt + 1, "retry_in_s": delay},
                )
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    def consumer_config(self) -> ConsumerConfig:
        """The bridge's durable pull consumer on the forwarded subjects."""
        subjects = [f"{PREFIX}.{name}" for name in self.settings.forward_events()]
        return ConsumerConfig(
            durable_name=self.settings.consumer_name,
            filter_subjects=subjects,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW if self.settings.bridge_deliver == "new" else DeliverPolicy.ALL,
            ack_wait=self.settings.ack_wait_s,
            max_ack_pending=1000,
        )

    async def ensure_consumer_before_intake(self) -> None:
        """Create the outbound consumer before any request is taken from the external bus (retrying until the events
        stream exists): with `DeliverPolicy.NEW`, an event published before it existed would never be forwarded."""
        attempt = 0
        while True:
            try:
                await self.ensure_consumer()
                return
            except _TRANSIENT as exc:  # the events stream not provisioned yet, NATS away
                if self.stopping.is_set():
                    raise Stopping("ensure_consumer") from exc
                delay = _backoff(attempt, self.settings.bridge_retry_max_s)
                attempt += 1
                log.warning("bridge consumer not created; retrying", extra={"error": repr(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)

    async def ensure_consumer(self) -> None:
        """Create (or update to the configured subjects) the bridge's own `bridge-*` consumer."""
        assert self.js is not None, "connect() first"
        config = self.consumer_config()
        try:
            await self.js.add_consumer(EVENTS_STREAM, config)
        except NotFoundError:
            raise  # no events stream yet: nothing to keep
        except APIError as exc:
            # An existing consumer whose start position differs cannot be updated: keep it, say so.
            log.warning("bridge consumer kept as it is", extra={"consumer": config.durable_name, "error": repr(exc)})
        log.info("bridge consumer ready", extra={"consumer": config.durable_name, "subjects": config.filter_subjects})

    def start_forwarding(self, deliver: Deliver) -> None:
        """Start the loop that sends chosen events out and acks each only after the external bus took it."""
        self._forwarder = asyncio.create_task(self._forward(deliver), name="bridge-forwarder")

    async def _forward(self, deliver: Deliver) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                await self.ensure_consumer()
                assert self.js is not None
                sub = await self.js.pull_subscribe_bind(durable=self.settings.consumer_name, stream=EVENTS_STREAM)
                attempt = 0
                while not self.stopping.is_set():
                    try:
                        batch = await sub.fetch(10, timeout=1.0)
                    except NatsTimeoutError:
                        continue
                    for msg in batch:
                        await self._forward_one(msg, deliver)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = _backoff(attempt, self.settings.bridge_retry_max_s)
                attempt += 1
                log.warning("forwarding paused", extra={"error": repr(exc), "retry_in_s": delay})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    async def _forward_one(self, msg: Msg, deliver: Deliver) -> None:
        attributes = attributes_from_nats(msg.headers)
        name = event_name_of(msg.subject)
        context = {"event_id": attributes.get("id"), "migration_id": attributes.get("subject"), "event": name}
        try:
            await deliver(msg.data, attributes, name)
        except Exception as exc:
            # The external bus did not take it: JetStream redelivers it after a pause (and so do we, in order).
            log.warning("forward failed; will retry", extra={**context, "error": repr(exc)})
            await msg.nak(delay=self.settings.bridge_retry_max_s)
            raise
        await msg.ack()
        self.forwarded += 1
        log.info("forwarded", extra=context)

    async def stop_forwarding(self) -> None:
        """Stop the forwarding loop (an in-flight event is acked only if the bus took it)."""
        self.stopping.set()
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forwarder
            self._forwarder = None

    async def close(self) -> None:
        """Drain nothing: in-flight inbound messages stay unacknowledged on the external bus."""
        self.stopping.set()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(OSError, NatsError):  # closing while NATS is down: nothing left to flush
                await self.nc.close()
