"""The CLI's view of where things are: the environment first, then what `llamaduo up` wrote."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic_settings import SettingsConfigDict

from llamaduo.embedded.stack import read_stack_file
from llamaduo.settings import WorkerSettings


class CliSettings(WorkerSettings):
    """Bus and store settings, plus the embedded stack's state folder."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    state_dir: Path = Path(".llamaduo")


def cli_settings() -> CliSettings:
    """Settings from the environment, filled in from a running embedded stack where the environment is silent."""
    settings = CliSettings()
    info = read_stack_file(settings.state_dir)
    if info:
        updates: dict[str, object] = {}
        if "LLAMADUO_NATS_URL" not in os.environ:
            updates["nats_url"] = info["nats_url"]
        if "LLAMADUO_STORE_URL" not in os.environ:
            updates["store_url"] = info["store_url"]
        settings = settings.model_copy(update=updates)
    return settings
