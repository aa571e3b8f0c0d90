"""The coordinator's settings (environment, `LLAMADUO_` prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from llamaduo.settings import WorkerSettings


class CoordinatorSettings(WorkerSettings):
    """Bus, store and logging, and how often running migrations are checked against their deadlines."""

    deadline_check_s: float = Field(
        default=15.0, gt=0.0, description="Seconds between sweeps that fail migrations past their deadline."
    )
    coverage_dirs: str = Field(
        default="",
        description=(
            "Comma-separated local directories a `migration.requested` event may name coverage files in, besides the "
            "artifact store (where `llamaduo migrate` uploads them). Empty: only the store."
        ),
    )

    def coverage_dir_paths(self) -> list[Path]:
        """`coverage_dirs` as paths."""
        return [Path(part.strip()) for part in self.coverage_dirs.split(",") if part.strip()]
