"""The bridge's settings (environment: `LLAMADUO_NATS_*` for NATS, `LLAMADUO_BRIDGE_*` for the external bus)."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from llamaduo.bus.settings import BusSettings
from llamaduo.contract import EVENTS_BY_NAME

Bus = Literal["kafka", "rabbitmq", "redis", "mqtt"]
BUSES: tuple[Bus, ...] = ("kafka", "rabbitmq", "redis", "mqtt")
DEFAULT_FORWARD = ("migration.graduated", "migration.failed")

# Per bus: (inbound topic/queue/stream, outbound topic/exchange/stream, dead letters, external URL).
_DEFAULTS: dict[Bus, tuple[str, str, str, str]] = {
    "kafka": ("llamaduo.requests", "llamaduo.events", "llamaduo.requests.dlq", "localhost:9092"),
    "rabbitmq": ("llamaduo.requests", "llamaduo.events", "llamaduo.requests.dlq", "amqp://guest:guest@localhost:5672/"),
    "redis": ("llamaduo:requests", "llamaduo:events", "llamaduo:requests:dlq", "redis://localhost:6379"),
    "mqtt": ("llamaduo/requests", "llamaduo/events", "llamaduo/requests/dlq", "mqtt://localhost:1883"),
}


class BridgeSettings(BusSettings):
    """Which external bus, where on it requests arrive and events leave, and which events to forward."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    log_level: str = "INFO"
    bridge_bus: Bus = Field(description="kafka, rabbitmq, redis or mqtt.")
    bridge_url: str | None = Field(default=None, description="The external bus (Kafka: host:port[,host:port]).")
    bridge_name: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Names this bridge's NATS consumer (bridge-<bus>-<name>) and its consumer group on the bus.",
    )
    bridge_inbound: str | None = Field(default=None, description="Topic / queue / stream carrying requests.")
    bridge_outbound: str | None = Field(
        default=None, description="Kafka topic, RabbitMQ topic exchange, Redis stream or MQTT topic prefix for events."
    )
    bridge_dead_letter: str | None = Field(default=None, description="Where invalid inbound messages go.")
    bridge_forward: str = Field(
        default=",".join(DEFAULT_FORWARD),
        description="Comma-separated event names sent back out (e.g. migration.graduated,progress), or `all`.",
    )
    bridge_deliver: Literal["new", "all"] = Field(
        default="new", description="Where a newly created NATS consumer starts: new events only, or the whole stream."
    )
    bridge_inbound_start: Literal["earliest", "latest"] = Field(
        default="earliest",
        description=(
            "Where a newly created Kafka or Redis consumer group starts on the inbound topic or stream: `earliest` "
            "takes requests published before the bridge first ran (repeats of known migrations are ignored "
            "downstream), `latest` only new ones."
        ),
    )
    bridge_source: str = Field(default="", description="CloudEvents `source` when a producer gives none.")
    bridge_mqtt_qos: Literal[1, 2] = 1
    bridge_mqtt_client_id: str | None = Field(
        default=None, description="MQTT client id (default llamaduo-bridge-<name>-<hostname>); unique per replica."
    )
    bridge_mqtt_session_expiry_s: int = Field(
        default=3600, ge=0, description="How long the broker keeps the session (and unacked messages) offline."
    )
    bridge_redis_claim_idle_s: float = Field(
        default=60.0, gt=0, description="A pending Redis entry idle this long is claimed again (redelivery)."
    )
    bridge_retry_max_s: float = Field(default=5.0, gt=0, description="Longest pause between NATS/bus retries.")

    @model_validator(mode="after")
    def _check_forward(self) -> BridgeSettings:
        self.forward_events()
        return self

    def forward_events(self) -> tuple[str, ...]:
        """The event names forwarded to the external bus, validated against the v1 contract."""
        raw = [item.strip() for item in self.bridge_forward.split(",") if item.strip()]
        if raw == ["all"]:
            return tuple(sorted(EVENTS_BY_NAME))
        unknown = [item for item in raw if item not in EVENTS_BY_NAME]
        if unknown or not raw:
            raise ValueError(
                f"LLAMADUO_BRIDGE_FORWARD: unknown event(s) {unknown or raw!r}; "
                f"use `all` or names from {sorted(EVENTS_BY_NAME)}"
            )
        return tuple(dict.fromkeys(raw))

    @property
    def inbound(self) -> str:
        return self.bridge_inbound or _DEFAULTS[self.bridge_bus][0]

    @property
    def outbound(self) -> str:
        return self.bridge_outbound or _DEFAULTS[self.bridge_bus][1]

    @property
    def dead_letter(self) -> str:
        return self.bridge_dead_letter or _DEFAULTS[self.bridge_bus][2]

    @property
    def url(self) -> str:
        return self.bridge_url or _DEFAULTS[self.bridge_bus][3]

    @property
    def consumer_name(self) -> str:
        """The bridge's durable NATS consumer on the events stream."""
        return f"bridge-{self.bridge_bus}-{self.bridge_name}"

    @property
    def group(self) -> str:
        """Kafka consumer group, Redis consumer group, MQTT shared-subscription group, shared by replicas."""
        return f"llamaduo-bridge-{self.bridge_name}"

    @property
    def mqtt_client_id(self) -> str:
        return self.bridge_mqtt_client_id or f"llamaduo-bridge-{self.bridge_name}-{socket.gethostname()}"[:64]

    @property
    def source(self) -> str:
        return self.bridge_source or f"llamaduo-bridge/{self.bridge_bus}"
