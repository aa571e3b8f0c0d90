"""Optional OpenTelemetry tracing across the bus (`pip install 'llamaduo[otel]'`, `LLAMADUO_TRACING=true`).

Consuming: FastStream's `NatsTelemetryMiddleware` opens a span per message, continuing the trace found in the
message's `traceparent` header. Publishing: our publisher writes through a JetStream context, so the context
handed to the workers injects the current span's `traceparent` into every event it publishes — the next service's
span joins the same trace. Spans are exported over OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the exporter reads its own standard variables).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

OTLP_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but the OpenTelemetry packages are not installed."""


def tracer_provider(service: str) -> TracerProvider:
    """A tracer provider for `service`, exporting over OTLP when an endpoint is configured."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            "LLAMADUO_TRACING=true needs the OpenTelemetry SDK: pip install 'llamaduo[otel]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": f"llamaduo-{service}"}))
    if any(os.environ.get(name) for name in OTLP_VARIABLES):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise TracingUnavailable(
                "an OTLP endpoint is configured but the exporter is missing: pip install 'llamaduo[otel]'"
            ) from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def telemetry_middleware(provider: TracerProvider) -> Any:
    """FastStream's NATS tracing middleware on `provider`."""
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware

    return NatsTelemetryMiddleware(tracer_provider=provider)


class TracedJetStream(JetStreamContext):
    """A JetStream context whose publishes carry the current trace context (W3C `traceparent`)."""

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,  # noqa: ASYNC109 (the signature of the method it overrides)
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> PubAck:
        from opentelemetry.propagate import inject

        carrier: dict[str, Any] = dict(headers or {})
        inject(carrier)
        return await super().publish(subject, payload, timeout, stream, carrier, msg_ttl)


def jetstream(nc: NatsClient, traced: bool) -> JetStreamContext:
    """The JetStream context the workers publish through: traced when tracing is on."""
    return TracedJetStream(nc) if traced else nc.jetstream()
