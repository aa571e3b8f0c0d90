"""Prometheus metrics of one service: FastStream's own middleware plus stage durations, queue lag and spend.

Each service process owns one `CollectorRegistry`. Stage durations are observed around every task; queue lag
(the pending and unacknowledged messages of the service's durable consumers) and the spend recorded in the
migration-state bucket are read from NATS when `/metrics` is scraped, so they are never staler than the scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llamaduo.bus.kv import StateStore
from llamaduo.bus.provisioning import EVENTS_STREAM, STATE_BUCKET
from llamaduo.contract.events import Spend
from llamaduo.telemetry import get_logger

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGE_BUCKETS = (0.05, 0.25, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200)
"""Seconds: a judge call takes well under a second, a training run can take hours."""
SCRAPE_TIMEOUT_S = 5.0
SPEND_EVERY_S = 15.0
"""Reading every migration's state is not free: spend is re-read at most this often."""
log = get_logger(__name__)


class ServiceMetrics:
    """The metrics of one service process, in a registry of its own."""

    def __init__(self, service: str, durables: Sequence[str], *, reports_spend: bool = False) -> None:
        self.service = service
        self.durables = tuple(durables)
        self.reports_spend = reports_spend
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "llamaduo_stage_duration_seconds",
            "Wall time of one task of a stage, from delivery to ack, nak or term.",
            ["service", "stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.tasks = Counter(
            "llamaduo_tasks",
            "Tasks handled, by outcome (done: the handler returned; error: it raised).",
            ["service", "stage", "outcome"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "llamaduo_queue_pending_messages",
            "Messages of the stream not yet delivered to the durable consumer (the lag KEDA scales on).",
            ["consumer"],
            registry=self.registry,
        )
        self.ack_pending = Gauge(
            "llamaduo_queue_ack_pending_messages",
            "Messages delivered to the durable consumer and not yet acknowledged (work in progress).",
            ["consumer"],
            registry=self.registry,
        )
        self.redelivered = Gauge(
            "llamaduo_queue_redelivered_messages",
            "Messages of the durable consumer delivered more than once and still unacknowledged.",
            ["consumer"],
            registry=self.registry,
        )
        self.spend_usd = Gauge(
            "llamaduo_spend_usd",
            "Service-LLM dollars charged to migrations, summed by migration status (from the state bucket).",
            ["status"],
            registry=self.registry,
        )
        self.llm_calls = Gauge(
            "llamaduo_service_llm_calls",
            "Service-LLM calls charged to migrations, summed by migration status (from the state bucket).",
            ["status"],
            registry=self.registry,
        )
        self.llm_tokens = Gauge(
            "llamaduo_service_llm_tokens",
            "Service-LLM tokens charged to migrations, by migration status and kind (prompt, completion).",
            ["status", "kind"],
            registry=self.registry,
        )
        self.migrations = Gauge(
            "llamaduo_migrations", "Migrations in the state bucket by status.", ["status"], registry=self.registry
        )
        self._spend_read_at = -SPEND_EVERY_S
        self.scrape_errors = Counter(
            "llamaduo_metrics_refresh_errors",
            "Scrapes whose bus-side figures (lag, spend) could not be read.",
            ["what"],
            registry=self.registry,
        )

    def middleware(self) -> NatsPrometheusMiddleware:
        """FastStream's NATS middleware (received/published messages, sizes, processing time) on this registry."""
        return NatsPrometheusMiddleware(registry=self.registry, app_name=f"llamaduo-{self.service}")

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time one task of `stage`."""
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "done"
        finally:
            self.stage_seconds.labels(self.service, stage).observe(time.perf_counter() - started)
            self.tasks.labels(self.service, stage, outcome).inc()

    async def refresh(self, js: JetStreamContext) -> None:
        """Read queue lag (and spend, for the coordinator) from NATS; a failure is counted, never raised."""
        for durable in self.durables:
            try:
                info = await asyncio.wait_for(js.consumer_info(EVENTS_STREAM, durable), SCRAPE_TIMEOUT_S)
            except Exception as exc:
                self.scrape_errors.labels("queue_lag").inc()
                log.warning("consumer info unavailable", extra={"consumer": durable, "error": repr(exc)})
                continue
            self.pending.labels(durable).set(info.num_pending or 0)
            self.ack_pending.labels(durable).set(info.num_ack_pending or 0)
            self.redelivered.labels(durable).set(info.num_redelivered or 0)
        if self.reports_spend and time.monotonic() - self._spend_read_at >= SPEND_EVERY_S:
            self._spend_read_at = time.monotonic()
            try:
                await asyncio.wait_for(self._refresh_spend(js), SCRAPE_TIMEOUT_S)
            except Exception as exc:
                self.scrape_errors.labels("spend").inc()
                log.warning("spend unavailable", extra={"error": repr(exc)})

    async def _refresh_spend(self, js: JetStreamContext) -> None:
        states = await StateStore(await js.key_value(STATE_BUCKET)).list()
        totals: dict[str, Spend] = {}
        count: dict[str, int] = {}
        for state in states:
            totals[state.status] = totals.get(state.status, Spend()) + state.spend
            count[state.status] = count.get(state.status, 0) + 1
        for gauge in (self.spend_usd, self.llm_calls, self.llm_tokens, self.migrations):
            gauge.clear()
        for status, spend in totals.items():
            self.spend_usd.labels(status).set(spend.usd)
            self.llm_calls.labels(status).set(spend.calls)
            self.llm_tokens.labels(status, "prompt").set(spend.prompt_tokens)
            self.llm_tokens.labels(status, "completion").set(spend.completion_tokens)
            self.migrations.labels(status).set(count[status])

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
