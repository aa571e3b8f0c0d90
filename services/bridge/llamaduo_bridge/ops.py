"""`/health` and `/metrics` of a bridge, on `LLAMADUO_HEALTH_PORT` like every other service.

`/health` asks both sides every time: the NATS connection (PING round trip and JetStream account info, the same probe
the five services use) and the external bus (the FastStream broker's own `ping`). 503 names the side that failed, so
a container health check or a Kubernetes probe restarts a bridge that lost either bus.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from faststream import FastStream
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from llamaduo.ops.health import BrokerProbe, OpsServer
from llamaduo.ops.metrics import CONTENT_TYPE
from llamaduo_bridge.buses import Adapter
from llamaduo_bridge.inbound import Counters
from llamaduo_bridge.nats_link import NatsLink
from llamaduo_bridge.settings import BridgeSettings

BUS_PING_TIMEOUT_S = 2.0


class BridgeMetrics:
    """What the bridge did since it started, read from its counters at each scrape."""

    def __init__(self, bus: str, counters: Counters, forwarded: Callable[[], int]) -> None:
        self.bus = bus
        self.counters = counters
        self.forwarded = forwarded
        self.registry = CollectorRegistry()
        self.inbound = Gauge(
            "llamaduo_bridge_inbound_messages",
            "External messages handled since start, by outcome (published on NATS, duplicate, dead-lettered).",
            ["bus", "outcome"],
            registry=self.registry,
        )
        self.dead_lettered = Gauge(
            "llamaduo_bridge_dead_lettered_messages",
            "External messages put on the bus's dead-letter path since start, by validation reason.",
            ["bus", "reason"],
            registry=self.registry,
        )
        self.forwarded_events = Gauge(
            "llamaduo_bridge_forwarded_events",
            "llamaduo.v1 events the external bus accepted since start.",
            ["bus"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of the current counters."""
        counts = {
            "published": self.counters.published,
            "duplicate": self.counters.duplicates,
            "dead_lettered": self.counters.dead_lettered,
        }
        for outcome, value in counts.items():
            self.inbound.labels(self.bus, outcome).set(value)
        for reason, value in self.counters.by_reason.items():
            self.dead_lettered.labels(self.bus, reason).set(value)
        self.forwarded_events.labels(self.bus).set(self.forwarded())
        return generate_latest(self.registry)


def attach_ops(app: FastStream, settings: BridgeSettings, link: NatsLink, adapter: Adapter, counters: Counters) -> None:
    """Serve `/health` and `/metrics` while the app runs (nothing when `LLAMADUO_HEALTH_PORT` is unset)."""
    if settings.health_port is None:
        return
    server = ops_server(settings, link, adapter, counters)
    app.on_startup(server.start)
    app.after_shutdown(server.stop)


def ops_server(settings: BridgeSettings, link: NatsLink, adapter: Adapter, counters: Counters) -> OpsServer:
    """The bridge's ops server (port 0 picks a free one)."""
    probe = BrokerProbe("bridge", lambda: link.nc)
    metrics = BridgeMetrics(settings.bridge_bus, counters, lambda: link.forwarded)

    async def health() -> tuple[int, str, bytes]:
        report = await probe.check()
        try:
            bus_ok = bool(await adapter.broker.ping(timeout=BUS_PING_TIMEOUT_S))
        except Exception as exc:  # a broker that was never connected raises instead of answering False
            bus_ok, error = False, repr(exc)
        else:
            error = "" if bus_ok else "no answer to ping"
        external: dict[str, object] = {"bus": settings.bridge_bus, "connected": bus_ok}
        if error:
            external["error"] = error
        healthy = report.healthy and bus_ok
        body = {
            "status": "ok" if healthy else "unavailable",
            "service": "bridge",
            "broker": report.broker,
            "external": external,
        }
        return (200 if healthy else 503), "application/json", json.dumps(body).encode()

    async def prometheus() -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, metrics.render()

    return OpsServer({"/health": health, "/metrics": prometheus}, settings.health_host, settings.health_port or 0)
