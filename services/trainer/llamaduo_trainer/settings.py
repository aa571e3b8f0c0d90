"""The trainer's settings (environment, `LLAMADUO_` prefix)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from llamaduo.localmodel import LocalModelSettings
from llamaduo.settings import WorkerSettings


class TrainerSettings(WorkerSettings, LocalModelSettings):
    """Bus, store, scratch space, the model cache and the device."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")
