"""Migration state as the coordinator keeps it in the KV bucket (read by the CLI and the workers)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.contract import ArtifactRef, MetricSummary, MigrationSpec, Spend
from llamaduo.contract.spec import Metric

Status = Literal["accepted", "running", "graduated", "failed", "cancelled"]
Decision = Literal["graduated", "need_more_data", "failed"]
TERMINAL: frozenset[str] = frozenset({"graduated", "failed", "cancelled"})


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


class IterationRecord(BaseModel):
    """What one fine-tune/evaluate round produced and what was decided."""

    # A newer coordinator may add fields: readers on the previous version (workers, the CLI) keep working through a
    # rolling upgrade instead of failing on a state they cannot parse.
    model_config = ConfigDict(extra="ignore")

    iteration: int = Field(ge=0)
    dataset: ArtifactRef
    train_rows: int = Field(ge=0)
    synthetic_rows: int = Field(ge=0)
    removed: dict[str, int] = Field(default_factory=dict)
    adapter: ArtifactRef | None = None
    judgments: ArtifactRef | None = None
    scores: dict[Metric, MetricSummary] | None = None
    failed_judgments: int = 0
    spend: Spend = Field(default_factory=Spend)
    decision: Decision | None = None
    decision_published: bool = False
    """The decision's event was accepted by JetStream: a later redelivery of the evaluation publishes nothing."""


class MigrationState(BaseModel):
    """The whole state of a migration; updated only by compare-and-set on the KV revision."""

    # A newer coordinator may add fields: readers on the previous version (workers, the CLI) keep working through a
    # rolling upgrade instead of failing on a state they cannot parse.
    model_config = ConfigDict(extra="ignore")

    migration_id: str
    spec: MigrationSpec
    status: Status = "accepted"
    iteration: int = 0
    train: ArtifactRef | None = None
    test: ArtifactRef | None = None
    iterations: list[IterationRecord] = Field(default_factory=list)
    spend: Spend = Field(default_factory=Spend)
    failure_reason: str | None = None
    failure_detail: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    resumed_at: datetime | None = Field(default=None, description="When it was last resumed (the deadline's start).")

    @property
    def terminal(self) -> bool:
        """Whether the migration has ended."""
        return self.status in TERMINAL

    @property
    def clock_started(self) -> datetime:
        """Where the wall-clock deadline counts from: the request, or the last resume."""
        return self.resumed_at or self.created_at

    def record(self, iteration: int) -> IterationRecord | None:
        """The record of `iteration`, if it started."""
        return next((item for item in self.iterations if item.iteration == iteration), None)

    def best(self) -> IterationRecord | None:
        """The scored iteration with the highest worst-metric mean."""
        scored = [item for item in self.iterations if item.scores and item.adapter]
        if not scored:
            return None
        return max(scored, key=lambda item: min(s.mean for s in (item.scores or {}).values()))
