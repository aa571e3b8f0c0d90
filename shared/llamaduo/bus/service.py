"""Assembling a service: a FastStream app whose subscribers attach to the provisioned durable consumers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError

from llamaduo.bus.provisioning import EVENTS_STREAM, consumer, provision
from llamaduo.bus.settings import BusSettings
from llamaduo.bus.worker import Handler, Worker
from llamaduo.contract import Event
from llamaduo.contract.events import Service
from llamaduo.ops.health import BrokerProbe, OpsServer
from llamaduo.ops.metrics import CONTENT_TYPE, ServiceMetrics
from llamaduo.ops.tracing import jetstream, telemetry_middleware, tracer_provider
from llamaduo.telemetry import configure_logging, get_logger

log = get_logger(__name__)


class NotProvisioned(RuntimeError):
    """The service may only attach, and its durable consumers are not there."""


@dataclass(frozen=True)
class Binding:
    """One input of a service: which durable consumer, which event model, which handler."""

    durable: str
    stage: str
    model: type[Event]
    handle: Handler[Any]
    skip_terminal: bool = True


async def provision_bus(settings: BusSettings) -> None:
    """Connect once and create whatever streams, consumers and buckets are missing."""
    connection = await nats.connect(**settings.connect_options())  # type: ignore[arg-type]
    try:
        await provision(connection.jetstream(), settings)
    finally:
        await connection.close()


async def wait_for_consumers(settings: BusSettings, durables: Sequence[str]) -> None:
    """Attach-only start: wait until every durable consumer of the service exists (provisioned by someone else)."""
    deadline = time.monotonic() + settings.attach_wait_s
    connection = await nats.connect(**settings.connect_options())  # type: ignore[arg-type]
    try:
        js = connection.jetstream()
        missing = list(durables)
        while True:
            still: list[str] = []
            for durable in missing:
                try:
                    await js.consumer_info(EVENTS_STREAM, durable)
                except NotFoundError:
                    still.append(durable)
            if not still:
                return
            if time.monotonic() >= deadline:
                raise NotProvisioned(
                    f"durable consumer(s) {', '.join(still)} missing on stream {EVENTS_STREAM} after "
                    f"{settings.attach_wait_s:g}s: run `llamaduo provision` with a NATS user allowed to manage "
                    "JetStream (see deploy/README.md), or set LLAMADUO_PROVISION_ON_START=true"
                )
            log.info("waiting for the bus to be provisioned", extra={"missing": still})
            missing = still
            await asyncio.sleep(2.0)
    finally:
        await connection.close()


def _connection(broker: NatsBroker) -> NatsClient | None:
    try:
        return broker.connection
    except Exception:  # FastStream raises before the first connect
        return None


def attach_ops(
    app: FastStream, broker: NatsBroker, service: str, settings: BusSettings, metrics: ServiceMetrics
) -> None:
    """Serve `/health` and `/metrics` on `settings.health_port` while the app runs (nothing when unset)."""
    if settings.health_port is None:
        return
    probe = BrokerProbe(service, lambda: _connection(broker))

    async def health() -> tuple[int, str, bytes]:
        report = await probe.check()
        return (200 if report.healthy else 503), "application/json", report.body()

    async def prometheus() -> tuple[int, str, bytes]:
        nc = _connection(broker)
        if nc is not None and nc.is_connected:
            await metrics.refresh(nc.jetstream())
        return 200, CONTENT_TYPE, metrics.render()

    async def root() -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps({"service": service, "paths": ["/health", "/metrics"]}).encode()

    server = OpsServer(
        {"/": root, "/health": health, "/metrics": prometheus}, settings.health_host, settings.health_port
    )
    # Listening starts before the broker connects, so a probe sees 503 (not a refused connection) meanwhile.
    app.on_startup(server.start)
    app.after_shutdown(server.stop)


def build_app(service: Service, settings: BusSettings, bindings: list[Binding]) -> tuple[FastStream, NatsBroker]:
    """A FastStream app for `service`; every binding's subscriber shares its durable across replicas."""
    metrics = ServiceMetrics(service, [b.durable for b in bindings], reports_spend=service == "coordinator")
    middlewares: list[Any] = [metrics.middleware()]
    if settings.tracing:
        middlewares.append(telemetry_middleware(tracer_provider(service)))
    broker = NatsBroker(
        settings.servers(),
        security=settings.broker_security(),
        inbox_prefix=settings.nats_inbox_prefix,
        graceful_timeout=settings.graceful_timeout_s,
        middlewares=middlewares,
        logger=logging.getLogger(f"llamaduo.faststream.{service}"),
        log_level=logging.DEBUG,
    )
    app = FastStream(broker, logger=logging.getLogger(f"llamaduo.faststream.{service}.app"))
    workers: dict[str, Worker[Any]] = {}

    def worker_for(binding: Binding) -> Worker[Any]:
        if binding.durable not in workers:
            workers[binding.durable] = Worker(
                service=service,
                stage=binding.stage,
                model=binding.model,
                handle=binding.handle,
                settings=settings,
                js=jetstream(broker.connection, settings.tracing),
                skip_terminal=binding.skip_terminal,
            )
        return workers[binding.durable]

    def handler_for(binding: Binding) -> Callable[[NatsMessage], Awaitable[None]]:
        async def on_message(msg: NatsMessage) -> None:
            with metrics.stage(binding.stage):
                await worker_for(binding).process(msg.raw_message)

        on_message.__name__ = f"{service}_{binding.durable.replace('-', '_')}"
        return on_message

    for binding in bindings:
        item = consumer(binding.durable)
        broker.subscriber(
            item.subject,
            stream=JStream(EVENTS_STREAM, declare=False),
            durable=item.durable,
            pull_sub=PullSub(batch_size=1, timeout=1.0),
            ack_policy=AckPolicy.MANUAL,
            inbox_prefix=f"{settings.nats_inbox_prefix}.".encode(),
        )(handler_for(binding))

    attach_ops(app, broker, service, settings, metrics)  # first: probes get answers while the bus is awaited

    @app.on_startup
    async def _provision() -> None:
        if settings.provision_on_start:
            await provision_bus(settings)
        else:
            await wait_for_consumers(settings, [b.durable for b in bindings])

    return app, broker


def run_app(app: FastStream) -> None:
    """Run until SIGINT/SIGTERM; in-flight tasks get the broker's graceful timeout to finish."""
    asyncio.run(app.run())


def run_service(service: Service, settings: BusSettings, bindings: Callable[[], list[Binding]]) -> None:
    """A service process's whole life: JSON logs, then its bindings (built after logging is set up), then run."""
    configure_logging(service, getattr(settings, "log_level", "INFO"))
    app, _ = build_app(service, settings, bindings())
    run_app(app)
