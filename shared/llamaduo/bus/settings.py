"""How a process reaches NATS and how its consumers behave, from `LLAMADUO_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
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

    stream_replicas: int = 1
    stream_max_age_s: float = 14 * 24 * 3600
    duplicate_window_s: float = 120.0

    ack_wait_s: float = 60.0
    heartbeat_s: float | None = None
    max_deliver: int = 5
    retry_base_delay_s: float = 2.0
    retry_max_delay_s: float = 60.0
    publish_timeout_s: float = 5.0
    graceful_timeout_s: float = 30.0

    @property
    def heartbeat_interval_s(self) -> float:
        """How often a live task tells JetStream it is still working (well inside `ack_wait`)."""
        return self.heartbeat_s if self.heartbeat_s is not None else max(self.ack_wait_s / 3.0, 0.2)

    def connect_options(self) -> dict[str, object]:
        """Keyword arguments for `nats.connect` / `NatsBroker` (secrets come only from here)."""
        options: dict[str, object] = {"servers": [s.strip() for s in self.nats_url.split(",")]}
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
        return options
