"""RabbitMQ: requests from a durable queue (with a dead-letter queue), events to a topic exchange.

- Inbound queue `LLAMADUO_BRIDGE_INBOUND` (default `llamaduo.requests`), declared durable with
  `x-dead-letter-exchange: ""` and `x-dead-letter-routing-key: <dead-letter queue>`, so whatever RabbitMQ itself
  dead-letters lands in the same place as what the bridge rejects. Prefetch 1, manual acks.
- An invalid message is copied to the dead-letter queue (default `llamaduo.requests.dlq`) with the error in the
  headers `llamaduo-error-reason` / `llamaduo-error-detail` (a plain reject cannot add headers), confirmed by the
  broker, and only then acknowledged.
- Events go to the durable topic exchange `LLAMADUO_BRIDGE_OUTBOUND` (default `llamaduo.events`) with the event
  name as routing key (`migration.graduated`), CloudEvents attributes as `cloudEvents_*` application properties,
  `content_type` and `message_id` (= the CloudEvents id) as AMQP properties, persistent, publisher-confirmed.
"""

from __future__ import annotations

from typing import Any

from faststream import AckPolicy
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitMessage, RabbitQueue

from llamaduo_bridge.buses.base import Adapter
from llamaduo_bridge.cloudevents import InvalidMessage
from llamaduo_bridge.inbound import InboundHandler
from llamaduo_bridge.native import error_headers, read_attributes, write_attributes
from llamaduo_bridge.nats_link import Stopping
from llamaduo_bridge.settings import BridgeSettings


class RabbitAdapter(Adapter):
    """The RabbitMQ side of the bridge."""

    def __init__(self, settings: BridgeSettings, handler: InboundHandler) -> None:
        super().__init__(settings, handler)
        self._broker = RabbitBroker(settings.url, **self.broker_options())
        self.queue = RabbitQueue(
            settings.inbound,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": settings.dead_letter},
        )
        self.dead_letter_queue = RabbitQueue(settings.dead_letter, durable=True)
        self.exchange = RabbitExchange(settings.outbound, type=ExchangeType.TOPIC, durable=True)
        self._broker.subscriber(self.queue, ack_policy=AckPolicy.MANUAL, channel=Channel(prefetch_count=1))(
            self.on_message
        )

    @property
    def broker(self) -> RabbitBroker:
        return self._broker

    async def open(self) -> None:
        await self._broker.declare_queue(self.dead_letter_queue)
        await self._broker.declare_exchange(self.exchange)

    async def on_message(self, msg: RabbitMessage) -> None:
        raw = msg.raw_message
        headers: dict[str, Any] = dict(raw.headers or {})

        async def dead_letter(exc: InvalidMessage) -> None:
            await self._broker.publish(
                raw.body,
                queue=self.dead_letter_queue,
                headers={**headers, **error_headers(exc.reason, exc.detail), "llamaduo-source-queue": self.queue.name},
                content_type=raw.content_type,
                message_id=raw.message_id,
                persist=True,
            )

        origin = {"bus": "rabbitmq", "queue": self.queue.name, "redelivered": bool(raw.redelivered)}
        try:
            await self.handler.handle(
                raw.body, read_attributes("rabbitmq", headers), raw.content_type, dead_letter, origin
            )
        except Stopping:
            await msg.nack()  # back to the queue for the next consumer; nothing was lost
            return
        await msg.ack()

    async def deliver(self, body: bytes, attributes: dict[str, str], event_name: str) -> None:
        headers: dict[str, Any] = dict(write_attributes("rabbitmq", attributes))
        await self._broker.publish(
            body,
            exchange=self.exchange,
            routing_key=event_name,
            headers=headers,
            content_type=attributes.get("datacontenttype", "application/json"),
            message_id=attributes.get("id"),
            persist=True,
            mandatory=False,  # nobody bound yet is not an error: events are broadcast
        )
