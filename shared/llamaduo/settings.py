"""Settings every worker service shares: the bus, the store, logging and a scratch directory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llamaduo.bus.settings import BusSettings
from llamaduo.store.settings import StoreSettings


class WorkerSettings(BusSettings, StoreSettings):
    """Bus, store, logging and scratch space (environment, `LLAMADUO_` prefix)."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    log_level: str = "INFO"
    work_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "llamaduo-work")
