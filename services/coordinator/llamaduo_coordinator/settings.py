"""The coordinator's settings (environment, `LLAMADUO_` prefix)."""

from __future__ import annotations

from pydantic import Field

from llamaduo.settings import WorkerSettings


class CoordinatorSettings(WorkerSettings):
    """Bus, store and logging, and how often running migrations are checked against their deadlines."""

    deadline_check_s: float = Field(
        default=15.0, gt=0.0, description="Seconds between sweeps that fail migrations past their deadline."
    )
