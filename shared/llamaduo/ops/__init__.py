"""Operating a service: `/health` with the broker's real ping, Prometheus `/metrics`, optional OpenTelemetry."""

from llamaduo.ops.health import BrokerProbe, HealthReport, OpsServer
from llamaduo.ops.metrics import ServiceMetrics
from llamaduo.ops.tracing import TracingUnavailable, tracer_provider

__all__ = ["BrokerProbe", "HealthReport", "OpsServer", "ServiceMetrics", "TracingUnavailable", "tracer_provider"]
