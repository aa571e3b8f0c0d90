"""`/health` and `/metrics` over plain HTTP/1.1 on asyncio: no web framework in the API-bound images.

`/health` asks the broker, every time: a PING/PONG round trip on the live connection (its RTT is reported) and
the JetStream account info. 200 with `"status": "ok"` when both answer, 503 with the reason otherwise, so a
container's health check and a Kubernetes probe see the bus as the service sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient

from llamaduo.telemetry import get_logger

PING_TIMEOUT_S = 2.0
MAX_REQUEST_LINE = 8192
log = get_logger(__name__)


@dataclass
class HealthReport:
    """What `/health` answers."""

    service: str
    healthy: bool
    broker: dict[str, Any] = field(default_factory=dict)

    def body(self) -> bytes:
        """The JSON body."""
        status = "ok" if self.healthy else "unavailable"
        return json.dumps({"status": status, "service": self.service, "broker": self.broker}).encode()


class BrokerProbe:
    """Checks the service's own NATS connection: connected, PING answered, JetStream reachable."""

    def __init__(self, service: str, connection: Callable[[], NatsClient | None]) -> None:
        self.service = service
        self.connection = connection

    async def check(self) -> HealthReport:
        """One real round trip to the server; never raises."""
        nc = self.connection()
        if nc is None:
            return HealthReport(self.service, False, {"connected": False, "error": "not connected yet"})
        broker: dict[str, Any] = {"connected": nc.is_connected, "server": _server_name(nc)}
        if not nc.is_connected:
            broker["error"] = "closed" if nc.is_closed else "reconnecting"
            return HealthReport(self.service, False, broker)
        try:
            rtt = await nc.rtt(timeout=PING_TIMEOUT_S)  # type: ignore[arg-type]
        except Exception as exc:
            broker["error"] = f"ping failed: {exc!r}"
            return HealthReport(self.service, False, broker)
        broker["rtt_ms"] = round(rtt * 1000, 3)
        try:
            info = await nc.jetstream().account_info()
        except Exception as exc:
            broker["error"] = f"jetstream unavailable: {exc!r}"
            return HealthReport(self.service, False, broker)
        broker["jetstream"] = {"streams": info.streams, "consumers": info.consumers}
        return HealthReport(self.service, True, broker)


def _server_name(nc: NatsClient) -> str | None:
    info = getattr(nc, "_server_info", None) or {}
    name = info.get("server_name") or info.get("server_id")
    return str(name) if name else None


Route = Callable[[], Awaitable[tuple[int, str, bytes]]]


class OpsServer:
    """A tiny HTTP server: GET routes only, one response per connection."""

    def __init__(self, routes: dict[str, Route], host: str, port: int) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (port 0 picks a free one; `port` is updated)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sockets = self._server.sockets or ()
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("ops endpoints listening", extra={"host": self.host, "port": self.port, "paths": sorted(self.routes)})

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, content_type, body = await self._respond(reader)
        except Exception as exc:  # a broken client or a failing route must never take the service down
            log.warning("ops request failed", extra={"error": repr(exc)})
            status, content_type, body = 500, "text/plain", b"internal error\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Error"}.get(
            status, "Service Unavailable"
        )
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        line = await asyncio.wait_for(reader.readline(), 5.0)
        if not line or len(line) > MAX_REQUEST_LINE:
            return 400, "text/plain", b"bad request\n"
        while (header := await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
            del header  # headers are not needed
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        route = self.routes.get(target)
        if route is None:
            return 404, "text/plain", f"no such path: {target}; try {', '.join(sorted(self.routes))}\n".encode()
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        return await route()
