"""How a process reaches NATS and how its consumers behave, from `LLAMADUO_*` environment variables."""

from __future__ import annotations

import ssl
from pathlib import Path

from faststream.nats import NatsSecurity
from faststream.nats.security import NatsCredentials, NatsNKey, NatsToken, NatsUserPassword
from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BusSettings(BaseSettings):
    """NATS connection and JetStream delivery settings."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_creds_file: Path | None = None
    nats_nkey_seed_file: Path | None = None
    nats_tls_ca_file: Path | None = None
    nats_tls_cert_file: Path | None = None
    nats_tls_key_file: Path | None = None
    nats_tls_hostname: str | None = None
    nats_inbox_prefix: str = "_INBOX"
    """Subject prefix of this process's reply inboxes. A service of its own (`_INBOX_judge`) lets the NATS
    permissions limit each service to its own replies instead of every `_INBOX.>`."""

    stream_replicas: int = 1
    stream_max_age_s: float = 14 * 24 * 3600
    duplicate_window_s: float = 120.0

    ack_wait_s: float = 60.0
    heartbeat_s: float | None = None
    max_deliver: int = 5
    retry_base_delay_s: float = 2.0
    retry_max_delay_s: float = 60.0
    publish_timeout_s: float = 5.0
    max_event_bytes: int = 256 * 1024
    graceful_timeout_s: float = 30.0

    provision_on_start: bool = True
    """Create missing streams, consumers and the state bucket at start. Under per-service NATS permissions a
    one-shot `llamaduo provision` (admin user) does it instead, and services only attach (set this false)."""
    attach_wait_s: float = 120.0
    """With `provision_on_start` false: how long a service waits for its consumers to be provisioned."""
    health_port: int | None = None
    """Serve `/health` and `/metrics` on this port (off when unset)."""
    health_host: str = "0.0.0.0"
    tracing: bool = False
    """OpenTelemetry spans across the bus (needs `llamaduo[otel]`); exported over OTLP only when
    `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set."""

    @model_validator(mode="after")
    def _check_tls_files(self) -> BusSettings:
        if not self.nats_inbox_prefix or any(c in self.nats_inbox_prefix for c in " .*>\t"):
            raise ValueError(
                f"LLAMADUO_NATS_INBOX_PREFIX={self.nats_inbox_prefix!r}: one subject token, no dots or wildcards"
            )
        mechanisms = [n for n in ("nats_creds_file", "nats_nkey_seed_file", "nats_token") if getattr(self, n)]
        if self.nats_user:
            mechanisms.append("nats_user")
        if len(mechanisms) > 1:
            names = ", ".join(f"LLAMADUO_{n.upper()}" for n in mechanisms)
            raise ValueError(f"choose one NATS authentication: {names} are all set")
        if (self.nats_tls_cert_file is None) != (self.nats_tls_key_file is None):
            raise ValueError("LLAMADUO_NATS_TLS_CERT_FILE and LLAMADUO_NATS_TLS_KEY_FILE go together: set both or none")
        for name in (
            "nats_tls_ca_file",
            "nats_tls_cert_file",
            "nats_tls_key_file",
            "nats_creds_file",
            "nats_nkey_seed_file",
        ):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"LLAMADUO_{name.upper()}={path}: no such file")
        return self

    @property
    def uses_tls(self) -> bool:
        """True when the connection is TLS (a CA or client certificate is configured, or a tls:// URL)."""
        return bool(self.nats_tls_ca_file or self.nats_tls_cert_file or self.nats_url.startswith("tls://"))

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context from the configured CA and client certificate, or None without TLS."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.nats_tls_ca_file) if self.nats_tls_ca_file else None
        )
        if self.nats_tls_cert_file and self.nats_tls_key_file:
            context.load_cert_chain(str(self.nats_tls_cert_file), str(self.nats_tls_key_file))
        return context

    @property
    def heartbeat_interval_s(self) -> float:
        """How often a live task tells JetStream it is still working (well inside `ack_wait`)."""
        return self.heartbeat_s if self.heartbeat_s is not None else max(self.ack_wait_s / 3.0, 0.2)

    def servers(self) -> list[str]:
        """The server URLs (`LLAMADUO_NATS_URL` is comma-separated)."""
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]

    def broker_security(self) -> NatsSecurity | None:
        """The same credentials and TLS as `connect_options`, as FastStream's `NatsBroker(security=...)` takes them."""
        tls: dict[str, object] = {"ssl_context": self.tls_context(), "tls_hostname": self.nats_tls_hostname}
        if self.nats_creds_file:
            return NatsCredentials(str(self.nats_creds_file), **tls)  # type: ignore[arg-type]
        if self.nats_nkey_seed_file:
            return NatsNKey.from_file(self.nats_nkey_seed_file, **tls)  # type: ignore[arg-type]
        if self.nats_user:
            password = self.nats_password.get_secret_value() if self.nats_password else ""
            return NatsUserPassword(self.nats_user, password, **tls)  # type: ignore[arg-type]
        if self.nats_token:
            return NatsToken(self.nats_token.get_secret_value(), **tls)  # type: ignore[arg-type]
        if tls["ssl_context"] is not None:
            return NatsSecurity(**tls)  # type: ignore[arg-type]
        return None

    def connect_options(self) -> dict[str, object]:
        """Keyword arguments for `nats.connect` / `NatsBroker` (secrets come only from here)."""
        options: dict[str, object] = {"servers": self.servers()}
        if self.nats_user:
            options["user"] = self.nats_user
        if self.nats_password:
            options["password"] = self.nats_password.get_secret_value()
        if self.nats_token:
            options["token"] = self.nats_token.get_secret_value()
        if self.nats_creds_file:
            options["user_credentials"] = str(self.nats_creds_file)
        if self.nats_nkey_seed_file:
            options["nkeys_seed"] = str(self.nats_nkey_seed_file)
        if self.nats_inbox_prefix != "_INBOX":
            options["inbox_prefix"] = self.nats_inbox_prefix
        context = self.tls_context()
        if context is not None:
            options["tls"] = context
            if self.nats_tls_hostname:
                options["tls_hostname"] = self.nats_tls_hostname
        return options
