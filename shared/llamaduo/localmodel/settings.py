"""Settings for loading local causal language models."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DeviceSetting = Literal["auto", "cpu", "cuda"]


class LocalModelSettings(BaseSettings):
    """Where converted models are cached and which device runs them (env prefix `LLAMADUO_`)."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    model_cache: Path = Field(default_factory=lambda: Path("~/.cache/llamaduo/models").expanduser())
    device: DeviceSetting = "auto"
