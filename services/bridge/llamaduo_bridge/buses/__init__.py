"""One adapter per external bus, each on FastStream's broker for that bus."""

from __future__ import annotations

from llamaduo_bridge.buses.base import Adapter
from llamaduo_bridge.inbound import InboundHandler
from llamaduo_bridge.settings import BridgeSettings


def build_adapter(settings: BridgeSettings, handler: InboundHandler) -> Adapter:
    """The adapter for `settings.bridge_bus` (each imports its own driver only when chosen)."""
    if settings.bridge_bus == "rabbitmq":
        from llamaduo_bridge.buses.rabbitmq import RabbitAdapter

        return RabbitAdapter(settings, handler)
    if settings.bridge_bus == "kafka":
        from llamaduo_bridge.buses.kafka import KafkaAdapter

        return KafkaAdapter(settings, handler)
    if settings.bridge_bus == "redis":
        from llamaduo_bridge.buses.redis_streams import RedisStreamsAdapter

        return RedisStreamsAdapter(settings, handler)
    from llamaduo_bridge.buses.mqtt import MqttAdapter

    return MqttAdapter(settings, handler)


__all__ = ["Adapter", "build_adapter"]
