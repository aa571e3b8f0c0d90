"""MQTT 5: requests from a topic at QoS 1 in a persistent session, events to `<prefix>/<event name>`.

- Inbound topic `LLAMADUO_BRIDGE_INBOUND` (default `llamaduo/requests`) subscribed at QoS 1 (or 2) with manual
  acknowledgement: the PUBACK goes out only after NATS accepted the event. The session is persistent
  (clean start off, session expiry `LLAMADUO_BRIDGE_MQTT_SESSION_EXPIRY_S`) so the broker redelivers an
  unacknowledged message when the bridge reconnects with the same client id.
- MQTT has no dead-letter mechanism: invalid messages are published (QoS 1) to `LLAMADUO_BRIDGE_DEAD_LETTER`
  (default `llamaduo/requests/dlq`) with their user properties plus `llamaduo-error-reason` /
  `llamaduo-error-detail`, counted and logged, then acknowledged.
- Events go to `LLAMADUO_BRIDGE_OUTBOUND/<event name>` (default `llamaduo/events/migration.graduated`), QoS 1, with
  the CloudEvents attributes as MQTT 5 user properties named by the attribute (`id`, `type`, `source`, ...) and
  the content type in the MQTT 5 content-type property (the CloudEvents MQTT binding, binary mode).
"""

from __future__ import annotations

import json
from typing import Any

import zmqtt
from faststream import AckPolicy
from faststream.mqtt import MQTTBroker, MQTTMessage

from llamaduo_bridge.buses.base import Adapter
from llamaduo_bridge.cloudevents import InvalidMessage
from llamaduo_bridge.inbound import InboundHandler
from llamaduo_bridge.native import error_headers, read_attributes, write_attributes
from llamaduo_bridge.nats_link import Stopping
from llamaduo_bridge.settings import BridgeSettings


class MqttAdapter(Adapter):
    """The MQTT side of the bridge."""

    def __init__(self, settings: BridgeSettings, handler: InboundHandler) -> None:
        super().__init__(settings, handler)
        self.qos = zmqtt.QoS(settings.bridge_mqtt_qos)
        self._broker = MQTTBroker(
            settings.url,
            client_id=settings.mqtt_client_id,
            clean_session=False,
            session_expiry_interval=settings.bridge_mqtt_session_expiry_s,
            version="5.0",
            **self.broker_options(),
        )
        self._broker.subscriber(settings.inbound, qos=self.qos, ack_policy=AckPolicy.MANUAL)(self.on_message)

    @property
    def broker(self) -> MQTTBroker:
        return self._broker

    async def on_message(self, msg: MQTTMessage) -> None:
        headers = {str(key): str(value) for key, value in msg.headers.items()}

        async def dead_letter(exc: InvalidMessage) -> None:
            await self._broker.publish(
                msg.body,
                topic=self.settings.dead_letter,
                qos=zmqtt.QoS.AT_LEAST_ONCE,
                headers={**headers, **error_headers(exc.reason, exc.detail), "llamaduo-source-topic": self.topic(msg)},
            )

        origin = {"bus": "mqtt", "topic": self.topic(msg)}
        try:
            await self.handler.handle(msg.body, read_attributes("mqtt", headers), msg.content_type, dead_letter, origin)
        except Stopping:
            return  # no PUBACK: the broker redelivers it to this session
        await msg.ack()

    @staticmethod
    def topic(msg: MQTTMessage) -> str:
        return str(msg.raw_message.topic)

    async def deliver(self, body: bytes, attributes: dict[str, str], event_name: str) -> None:
        payload: Any = json.loads(body)  # a JSON body makes FastStream set the MQTT 5 content type
        await self._broker.publish(
            payload,
            topic=f"{self.settings.outbound}/{event_name}",
            qos=self.qos,
            headers=write_attributes("mqtt", attributes),
        )
