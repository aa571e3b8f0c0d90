"""OpenTelemetry across the bus (LLAMADUO_TRACING=true): a service's span continues the trace that arrived in the
message's `traceparent`, and what the service publishes carries the same trace on to the next service."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llamaduo.bus.service as service_module
from llamaduo.bus import Binding, BusSettings, build_app, provision_bus
from llamaduo.bus.provisioning import EVENTS_STREAM
from llamaduo.bus.worker import TaskContext
from llamaduo.contract import Event, MigrationCancel, encode, headers_for, subject_for
from llamaduo.embedded.nats_server import NatsServer
from llamaduo.ops import tracing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


async def test_a_task_continues_the_incoming_trace_and_passes_it_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(service_module, "tracer_provider", lambda service: provider)
    handled = asyncio.Event()

    async def on_cancel(event: MigrationCancel, ctx: TaskContext) -> Sequence[Event]:
        await ctx.progress("cancel", 1, 1, "tracing test")
        handled.set()
        return []

    with NatsServer(tmp_path / "nats") as server:
        settings = BusSettings(nats_url=server.url, tracing=True)
        await provision_bus(settings)
        app, _ = build_app(
            "coordinator", settings, [Binding("coordinator-cancel", "cancel", MigrationCancel, on_cancel, False)]
        )
        await app.start()
        nc = await nats.connect(server.url)
        try:
            event = MigrationCancel(migration_id="traced-001")
            headers = headers_for(event, ce_id="traced-001:cancel", source="test") | {"traceparent": PARENT}
            await nc.jetstream().publish(subject_for(event), encode(event), stream=EVENTS_STREAM, headers=headers)
            await asyncio.wait_for(handled.wait(), 20)
            progress = await nc.jetstream().get_last_msg(EVENTS_STREAM, "llamaduo.v1.progress")
        finally:
            await nc.close()
            await app.stop()
    outgoing = (progress.headers or {}).get("traceparent", "")
    assert outgoing.split("-")[1] == TRACE_ID, "the published event carries the incoming trace on"
    spans = exporter.get_finished_spans()
    consume = [s for s in spans if s.context is not None and format(s.context.trace_id, "032x") == TRACE_ID]
    assert consume, f"no span joined the incoming trace: {[s.name for s in spans]}"
    assert outgoing.split("-")[2] in {format(s.context.span_id, "016x") for s in consume if s.context is not None}


def test_tracing_without_the_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_otel(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("opentelemetry.sdk"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_otel)
    with pytest.raises(tracing.TracingUnavailable, match=r"llamaduo\[otel\]"):
        tracing.tracer_provider("judge")
