"""Kafka: requests from a topic in a consumer group (manual commits), events to a topic keyed by migration.

- Inbound topic `LLAMADUO_BRIDGE_INBOUND` (default `llamaduo.requests`), consumer group `llamaduo-bridge-<name>`
  (a new group starts at `LLAMADUO_BRIDGE_INBOUND_START`, default the earliest offset), auto-commit off: an offset
  is committed only after NATS accepted the event (or after the dead-letter topic acknowledged an invalid message),
  so a crash before that redelivers from the last committed offset.
- Invalid messages go to the topic `LLAMADUO_BRIDGE_DEAD_LETTER` (default `llamaduo.requests.dlq`) with their key,
  their headers and `llamaduo-error-reason` / `llamaduo-error-detail`.
- Events go to `LLAMADUO_BRIDGE_OUTBOUND` (default `llamaduo.events`) keyed by migration id (per-migration order),
  CloudEvents attributes as `ce_*` headers and `content-type` (the Kafka protocol binding, binary mode).
"""

from __future__ import annotations

from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage

from llamaduo_bridge.buses.base import Adapter
from llamaduo_bridge.cloudevents import InvalidMessage
from llamaduo_bridge.inbound import InboundHandler
from llamaduo_bridge.native import error_headers, read_attributes, write_attributes
from llamaduo_bridge.nats_link import Stopping
from llamaduo_bridge.settings import BridgeSettings


class KafkaAdapter(Adapter):
    """The Kafka side of the bridge."""

    def __init__(self, settings: BridgeSettings, handler: InboundHandler) -> None:
        super().__init__(settings, handler)
        servers = [item.strip() for item in settings.url.split(",") if item.strip()]
        self._broker = KafkaBroker(servers, **self.broker_options())
        self._broker.subscriber(
            settings.inbound,
            group_id=settings.group,
            ack_policy=AckPolicy.MANUAL,
            max_records=1,
            auto_offset_reset=settings.bridge_inbound_start,
        )(self.on_message)

    @property
    def broker(self) -> KafkaBroker:
        return self._broker

    async def on_message(self, msg: KafkaMessage) -> None:
        raw: Any = msg.raw_message  # one ConsumerRecord (max_records=1, not a batch)
        headers = {str(key): str(value) for key, value in msg.headers.items()}

        async def dead_letter(exc: InvalidMessage) -> None:
            await self._broker.publish(
                msg.body,
                topic=self.settings.dead_letter,
                key=getattr(raw, "key", None),
                headers={**headers, **error_headers(exc.reason, exc.detail), "llamaduo-source-topic": raw.topic},
            )

        origin = {"bus": "kafka", "topic": raw.topic, "partition": raw.partition, "offset": raw.offset}
        try:
            await self.handler.handle(
                msg.body, read_attributes("kafka", headers), headers.get("content-type"), dead_letter, origin
            )
        except Stopping:
            return  # not committed: the group redelivers it from the last committed offset
        await msg.ack()

    async def deliver(self, body: bytes, attributes: dict[str, str], event_name: str) -> None:
        headers = write_attributes("kafka", attributes)
        headers["content-type"] = attributes.get("datacontenttype", "application/json")
        subject = attributes.get("subject")
        await self._broker.publish(
            body, topic=self.settings.outbound, key=subject.encode() if subject else None, headers=headers
        )
