"""`llamaduo-bridge`: the FastStream app of one bridge between NATS and an external bus."""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream import FastStream
from pydantic import ValidationError

from llamaduo.telemetry import configure_logging
from llamaduo_bridge.buses import Adapter, build_adapter
from llamaduo_bridge.inbound import InboundHandler
from llamaduo_bridge.nats_link import NatsLink
from llamaduo_bridge.ops import attach_ops
from llamaduo_bridge.settings import BridgeSettings

log = logging.getLogger(__name__)


class Bridge:
    """NATS link + the bus adapter: requests in, chosen events out."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.link = NatsLink(settings)
        self.handler = InboundHandler(settings, self.link)
        self.adapter: Adapter = build_adapter(settings, self.handler)

    async def open(self, *, connect_bus: bool = True) -> None:
        """Connect NATS and (unless a test broker stands in for it) the external bus; declare what it needs."""
        await self.link.connect()
        await self.link.ensure_consumer_before_intake()
        if connect_bus:
            await self.adapter.broker.connect()
        await self.adapter.open()

    def start_forwarding(self) -> None:
        self.link.start_forwarding(self.adapter.deliver)
        log.info(
            "bridge running",
            extra={
                "bus": self.settings.bridge_bus,
                "inbound": self.settings.inbound,
                "outbound": self.settings.outbound,
                "dead_letter": self.settings.dead_letter,
                "forward": list(self.settings.forward_events()),
                "consumer": self.settings.consumer_name,
            },
        )

    async def start(self) -> None:
        """Everything, in order (what the app does; tests use it directly)."""
        await self.open()
        await self.adapter.broker.start()
        self.start_forwarding()

    async def stop(self, *, stop_bus: bool = True) -> None:
        """Stop taking work: held messages go back unacknowledged, then close both sides."""
        self.link.stopping.set()
        await self.link.stop_forwarding()
        if stop_bus:
            await self.adapter.broker.stop()
        await self.adapter.close()
        await self.link.close()

    def app(self) -> FastStream:
        """The FastStream app; SIGTERM stops it with the broker's graceful timeout."""
        app = FastStream(self.adapter.broker, logger=logging.getLogger("llamaduo.faststream.bridge.app"))

        @app.on_startup
        async def _open() -> None:
            await self.open()

        @app.after_startup
        async def _forward() -> None:
            self.start_forwarding()

        @app.on_shutdown
        async def _stop_taking() -> None:
            self.link.stopping.set()
            await self.link.stop_forwarding()

        @app.after_shutdown
        async def _close() -> None:
            await self.adapter.close()
            await self.link.close()

        attach_ops(app, self.settings, self.link, self.adapter, self.handler.counters)
        return app


def main() -> None:
    """Run the bridge configured by the environment until SIGINT/SIGTERM."""
    try:
        settings = BridgeSettings()  # type: ignore[call-arg]  # LLAMADUO_BRIDGE_BUS comes from the environment
    except ValidationError as exc:
        problems = "; ".join(
            (f"LLAMADUO_{'_'.join(map(str, err['loc'])).upper()}: " if err["loc"] else "") + err["msg"]
            for err in exc.errors()
        )
        print(f"llamaduo-bridge: invalid settings: {problems}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("bridge", settings.log_level)
    asyncio.run(Bridge(settings).app().run())
