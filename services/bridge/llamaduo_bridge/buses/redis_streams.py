"""Redis Streams: requests from a stream through a consumer group, events appended to another stream.

- Inbound stream `LLAMADUO_BRIDGE_INBOUND` (default `llamaduo:requests`), consumer group `llamaduo-bridge-<name>`
  (created with MKSTREAM when missing, at the stream's start or end by `LLAMADUO_BRIDGE_INBOUND_START`, default the
  start). An entry carries the event body in the field `data`
  and CloudEvents attributes in `ce_*` fields (`content-type` optional), or a structured CloudEvent in `data`.
  It is XACKed only after NATS accepted the event. Entries left pending by a crashed bridge are claimed again
  (XAUTOCLAIM) once idle for `LLAMADUO_BRIDGE_REDIS_CLAIM_IDLE_S`: that is Redis's redelivery.
- Invalid entries are appended to `LLAMADUO_BRIDGE_DEAD_LETTER` (default `llamaduo:requests:dlq`) with their fields
  plus `llamaduo-error-reason`, `llamaduo-error-detail` and `llamaduo-source-id`, then XACKed.
- Events are appended to `LLAMADUO_BRIDGE_OUTBOUND` (default `llamaduo:events`) as `ce_*` fields, `content-type`
  and `data` (the event body).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from faststream import AckPolicy
from faststream.redis import RedisBroker, RedisStreamMessage, StreamSub
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from llamaduo_bridge.buses.base import Adapter
from llamaduo_bridge.cloudevents import InvalidMessage
from llamaduo_bridge.inbound import InboundHandler
from llamaduo_bridge.native import error_headers, read_attributes, write_attributes
from llamaduo_bridge.nats_link import Stopping
from llamaduo_bridge.settings import BridgeSettings

FASTSTREAM_DATA = "__data__"


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes | bytearray) else str(value)


class RedisStreamsAdapter(Adapter):
    """The Redis Streams side of the bridge."""

    def __init__(self, settings: BridgeSettings, handler: InboundHandler) -> None:
        super().__init__(settings, handler)
        self._broker = RedisBroker(settings.url, **self.broker_options())
        self._client: Redis | None = None
        consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._broker.subscriber(
            stream=StreamSub(settings.inbound, group=settings.group, consumer=consumer, max_records=1),
            ack_policy=AckPolicy.MANUAL,
        )(self.on_message)
        # A second reader of the same group claims entries another consumer left pending (it crashed).
        self._broker.subscriber(
            stream=StreamSub(
                settings.inbound,
                group=settings.group,
                consumer=f"{consumer}-claim",
                min_idle_time=int(settings.bridge_redis_claim_idle_s * 1000),
            ),
            ack_policy=AckPolicy.MANUAL,
        )(self.on_message)

    @property
    def broker(self) -> RedisBroker:
        return self._broker

    async def open(self) -> None:
        self._client = Redis.from_url(self.settings.url)
        # The group is created here, before FastStream's subscribers start (they would create it at the stream's end):
        # with `earliest`, requests appended before the bridge first ran are taken too.
        start = "0" if self.settings.bridge_inbound_start == "earliest" else "$"
        try:
            await self._client.xgroup_create(self.settings.inbound, self.settings.group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> Redis:
        assert self._client is not None, "open() first"
        return self._client

    async def on_message(self, msg: RedisStreamMessage) -> None:
        raw: dict[str, Any] = dict(msg.raw_message)
        fields = {_text(key): value for key, value in dict(raw.get("data") or {}).items()}
        ids = [_text(item) for item in raw.get("message_ids") or []]
        entry_id = ids[0] if ids else None
        problem: InvalidMessage | None = None
        if FASTSTREAM_DATA in fields:  # a FastStream producer: headers and body in its own envelope
            attributes = read_attributes("redis", msg.headers)
            content_type = msg.headers.get("content-type")
            body = msg.body
        else:
            attributes = read_attributes("redis", fields)
            content_type = _text(fields["content-type"]) if "content-type" in fields else None
            data = fields.get("data")
            body = data if isinstance(data, bytes) else _text(data).encode() if data is not None else b""
            if data is None:
                problem = InvalidMessage("missing_data", f"stream entry has no `data` field (fields: {sorted(fields)})")

        async def dead_letter(exc: InvalidMessage) -> None:
            out: dict[Any, Any] = dict(fields)
            out.update(error_headers(exc.reason, exc.detail))
            out["llamaduo-source-stream"] = self.settings.inbound
            out["llamaduo-source-id"] = entry_id or ""
            await self.client.xadd(self.settings.dead_letter, out)

        origin = {"bus": "redis", "stream": self.settings.inbound, "entry_id": entry_id}
        try:
            await self.handler.handle(body, attributes, content_type, dead_letter, origin, problem)
        except Stopping:
            return  # stays pending in the group: claimed again once idle
        await msg.ack()

    async def deliver(self, body: bytes, attributes: dict[str, str], event_name: str) -> None:
        fields: dict[Any, Any] = dict(write_attributes("redis", attributes))
        fields["content-type"] = attributes.get("datacontenttype", "application/json")
        fields["data"] = body
        await self.client.xadd(self.settings.outbound, fields)
