"""Assembling a service: a FastStream app whose subscribers attach to the provisioned durable consumers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage

from llamaduo.bus.provisioning import EVENTS_STREAM, consumer, provision
from llamaduo.bus.settings import BusSettings
from llamaduo.bus.worker import Handler, Worker
from llamaduo.contract import Event
from llamaduo.contract.events import Service
from llamaduo.telemetry import configure_logging


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


def build_app(service: Service, settings: BusSettings, bindings: list[Binding]) -> tuple[FastStream, NatsBroker]:
    """A FastStream app for `service`; every binding's subscriber shares its durable across replicas."""
    broker = NatsBroker(
        **settings.connect_options(),  # type: ignore[arg-type]
        graceful_timeout=settings.graceful_timeout_s,
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
                js=broker.connection.jetstream(),
                skip_terminal=binding.skip_terminal,
            )
        return workers[binding.durable]

    def handler_for(binding: Binding) -> Callable[[NatsMessage], Awaitable[None]]:
        async def on_message(msg: NatsMessage) -> None:
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
        )(handler_for(binding))

    @app.on_startup
    async def _provision() -> None:
        await provision_bus(settings)

    return app, broker


def run_app(app: FastStream) -> None:
    """Run until SIGINT/SIGTERM; in-flight tasks get the broker's graceful timeout to finish."""
    asyncio.run(app.run())


def run_service(service: Service, settings: BusSettings, bindings: Callable[[], list[Binding]]) -> None:
    """A service process's whole life: JSON logs, then its bindings (built after logging is set up), then run."""
    configure_logging(service, getattr(settings, "log_level", "INFO"))
    app, _ = build_app(service, settings, bindings())
    run_app(app)
