"""The v1 events: one pydantic model per event, the public contract between services."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.contract.artifacts import MIGRATION_ID_PATTERN, ArtifactRef
from llamaduo.contract.spec import BudgetSpec, Metric, MigrationSpec

SCHEMA_VERSION = 1
Service = Literal["coordinator", "synthesizer", "trainer", "inferencer", "judge", "client"]


class Event(BaseModel):
    """Fields every event body carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    """The event's name: its subject is `llamaduo.v1.<name>`."""

    schema_version: Literal[1] = Field(default=1, description="Version of this body's schema.")
    migration_id: str = Field(pattern=MIGRATION_ID_PATTERN)


class IterationEvent(Event):
    """An event about one iteration (0 is the first fine-tune on the coverage train split)."""

    iteration: int = Field(ge=0)


class MigrationRequested(Event):
    """A client asks for a migration."""

    name: ClassVar[str] = "migration.requested"
    spec: MigrationSpec


class Spend(BaseModel):
    """Service-LLM usage charged to a migration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calls: int = Field(default=0, ge=0)
    cached_calls: int = Field(default=0, ge=0)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    usd: float = Field(default=0.0, ge=0.0, description="Dollars of every call behind this output, paid once.")
    cached_usd: float = Field(default=0.0, ge=0.0, description="Part of `usd` answered from the cache this time.")

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            calls=self.calls + other.calls,
            cached_calls=self.cached_calls + other.cached_calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            usd=self.usd + other.usd,
            cached_usd=self.cached_usd + other.cached_usd,
        )


class DatasetReady(IterationEvent):
    """The training data of an iteration is in the store; the trainer picks it up."""

    name: ClassVar[str] = "dataset.ready"
    spec: MigrationSpec
    dataset: ArtifactRef = Field(description="Manifest (JSON) listing the train shards with their sha256.")
    test: ArtifactRef = Field(description="The held-out test split (JSONL); never trained on.")
    train_rows: int = Field(ge=0)
    synthetic_rows: int = Field(ge=0, description="Rows of the dataset that the service LLM wrote.")
    removed: dict[str, int] = Field(default_factory=dict, description="Rows dropped this round, per reason.")
    spend: Spend = Field(default_factory=Spend, description="Service-LLM spend of this round's synthesis.")
    budget_exhausted: bool = Field(
        default=False, description="Synthesis stopped early because the next calls would pass budgets.max_cost_usd."
    )


class ModelTrained(IterationEvent):
    """An adapter was fine-tuned for the iteration."""

    name: ClassVar[str] = "model.trained"
    spec: MigrationSpec
    adapter: ArtifactRef = Field(description="PEFT adapter directory as an uncompressed tar.")
    dataset: ArtifactRef
    test: ArtifactRef
    train_loss: float | None = None
    steps: int = Field(ge=0)
    train_seconds: float = Field(ge=0.0)


class ResponsesReady(IterationEvent):
    """The fine-tuned model answered every test prompt."""

    name: ClassVar[str] = "responses.ready"
    spec: MigrationSpec
    adapter: ArtifactRef
    dataset: ArtifactRef
    test: ArtifactRef
    responses: ArtifactRef = Field(description="JSONL: per test prompt, its k responses with token counts.")
    prompts: int = Field(ge=0)
    responses_per_prompt: int = Field(ge=1)


class MetricSummary(BaseModel):
    """Aggregate of one metric over every judged response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float
    median: float
    share_ge_50: float = Field(ge=0.0, le=1.0)
    share_ge_70: float = Field(ge=0.0, le=1.0)
    judged: int = Field(ge=0)
    ci_low: float | None = Field(default=None, description="Lower bound of the bootstrap CI of the mean.")
    ci_high: float | None = Field(default=None, description="Upper bound of the bootstrap CI of the mean.")


class Agreement(BaseModel):
    """How much the judges of a panel agree, per metric, over the responses they all scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    judges: list[str]
    spearman: dict[Metric, float | None] = Field(description="Mean pairwise Spearman rank correlation.")
    krippendorff_alpha: dict[Metric, float | None] = Field(description="Krippendorff's alpha, interval metric.")
    per_judge: dict[str, dict[Metric, MetricSummary]] = Field(default_factory=dict)


class EvaluationCompleted(IterationEvent):
    """The judge scored the iteration's responses."""

    name: ClassVar[str] = "evaluation.completed"
    spec: MigrationSpec
    adapter: ArtifactRef
    dataset: ArtifactRef
    test: ArtifactRef
    judgments: ArtifactRef = Field(description="JSONL: per response, each metric's scores and the judge's reason.")
    scores: dict[Metric, MetricSummary]
    failed_judgments: int = Field(ge=0, description="Judgments that never produced a valid score.")
    spend: Spend = Field(default_factory=Spend)
    judges: list[str] = Field(default_factory=list, description="Model names of the judge (or the panel).")
    agreement: Agreement | None = Field(default=None, description="Panel agreement; None with a single judge.")
    budget_exhausted: bool = Field(
        default=False, description="Judging stopped early because the next calls would pass budgets.max_cost_usd."
    )


class NeedMoreData(IterationEvent):
    """The coordinator decided the model of `iteration` falls short: synthesize data for `iteration + 1`."""

    name: ClassVar[str] = "migration.need_more_data"
    spec: MigrationSpec
    dataset: ArtifactRef = Field(description="The manifest the iteration trained on.")
    test: ArtifactRef
    judgments: ArtifactRef
    new_rows: int = Field(ge=1, description="How many new synthetic rows to add.")
    round_index: int = Field(ge=0, description="0 for the first synthesis round.")


class MigrationGraduated(IterationEvent):
    """The model cleared the thresholds; its adapter is the migration's result."""

    name: ClassVar[str] = "migration.graduated"
    adapter: ArtifactRef
    base_model: str
    scores: dict[Metric, MetricSummary]
    thresholds: dict[Metric, float]
    spend: Spend


class MigrationFailed(Event):
    """The migration ended without graduating; `reason` is machine-readable, `detail` is for people."""

    name: ClassVar[str] = "migration.failed"
    iteration: int | None = Field(default=None, ge=0)
    reason: str = Field(description="e.g. invalid_dataset, budget:iterations, cancelled, task_failed:trainer")
    detail: str = ""
    best_adapter: ArtifactRef | None = None
    best_scores: dict[Metric, MetricSummary] | None = None
    spend: Spend = Field(default_factory=Spend)
    resumed: int = Field(default=0, ge=0, description="The migration's resume count when it failed.")


class MigrationCancel(Event):
    """A client asks to stop a migration."""

    name: ClassVar[str] = "migration.cancel"
    reason: str = Field(default="cancelled by user", max_length=1000)


class MigrationResume(Event):
    """A client asks to continue a failed or cancelled migration from its last completed stage."""

    name: ClassVar[str] = "migration.resume"
    request_id: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Unique per request (dedup id)."
    )
    budgets: BudgetSpec | None = Field(default=None, description="New budgets (e.g. more iterations or dollars).")
    reason: str = Field(default="resumed by user", max_length=1000)


class TaskFailed(Event):
    """A worker gave up on a task (poison input or retries exhausted)."""

    name: ClassVar[str] = "task.failed"
    iteration: int | None = Field(default=None, ge=0)
    service: Service
    stage: str
    reason: str = Field(description="Machine-readable: invalid_event, missing_artifact, checksum_mismatch, ...")
    detail: str = ""
    input_event_id: str | None = None


class Progress(Event):
    """Where a worker is within a stage; observers render it, nobody depends on it."""

    name: ClassVar[str] = "progress"
    iteration: int | None = Field(default=None, ge=0)
    service: Service
    stage: str
    done: int = Field(ge=0)
    total: int | None = Field(default=None, ge=0)
    message: str = ""


ALL_EVENTS: tuple[type[Event], ...] = (
    MigrationRequested,
    DatasetReady,
    ModelTrained,
    ResponsesReady,
    EvaluationCompleted,
    NeedMoreData,
    MigrationGraduated,
    MigrationFailed,
    MigrationCancel,
    MigrationResume,
    TaskFailed,
    Progress,
)
EVENTS_BY_NAME: dict[str, type[Event]] = {event.name: event for event in ALL_EVENTS}
