"""What every bus adapter provides: a FastStream broker consuming requests, and a way to send events out."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from llamaduo_bridge.inbound import InboundHandler
from llamaduo_bridge.settings import BridgeSettings


class Adapter(ABC):
    """Consumes requests from the external bus (one at a time) and publishes events to it."""

    def __init__(self, settings: BridgeSettings, handler: InboundHandler) -> None:
        self.settings = settings
        self.handler = handler
        self.logger = logging.getLogger(f"llamaduo.bridge.{settings.bridge_bus}")

    @property
    @abstractmethod
    def broker(self) -> Any:
        """The FastStream broker (Kafka, Rabbit, Redis or MQTT) with the request subscriber registered."""

    async def open(self) -> None:  # noqa: B027 - most buses need nothing declared
        """Declare what the bus needs before consuming (queues, exchanges, clients); the broker is connected."""

    async def close(self) -> None:  # noqa: B027
        """Release what `open` made."""

    @abstractmethod
    async def deliver(self, body: bytes, attributes: dict[str, str], event_name: str) -> None:
        """Publish one v1 event in binary mode, attributes in native headers; return once the bus has it."""

    def broker_options(self) -> dict[str, Any]:
        """Options every FastStream broker of the bridge shares."""
        return {
            "graceful_timeout": self.settings.graceful_timeout_s,
            "logger": logging.getLogger(f"llamaduo.faststream.bridge.{self.settings.bridge_bus}"),
            "log_level": logging.DEBUG,
        }
