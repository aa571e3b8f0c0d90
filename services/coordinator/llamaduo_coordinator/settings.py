"""The coordinator's settings (environment, `LLAMADUO_` prefix)."""

from __future__ import annotations

from llamaduo.settings import WorkerSettings


class CoordinatorSettings(WorkerSettings):
    """Bus, store and logging; the coordinator needs nothing else."""
