"""What a migration report shows, assembled from the migration state and the artifact store."""

from __future__ import annotations

import shlex
import statistics
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.contract import ArtifactRef, Spend
from llamaduo.contract.spec import Metric
from llamaduo.data import ChatRow, parse_jsonl
from llamaduo.data.results import Judgment, PromptResponses, load_models
from llamaduo.report.breakeven import BreakEven, estimate_break_even
from llamaduo.report.stages import INFERENCE, JUDGMENTS, RESPONSES, IterationFiles
from llamaduo.state import Decision, IterationRecord, MigrationState, Status
from llamaduo.store import ArtifactStore

EXAMPLES_SHOWN = 3
SERVE_BASE_URL = "http://127.0.0.1:8000/v1"
ResponseKey = tuple[int, int]


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricPoint(_Item):
    """One metric of one evaluated iteration, with its bootstrap CI and the spec's threshold."""

    mean: float
    ci_low: float | None
    ci_high: float | None
    judged: int
    threshold: float | None


class IterationRow(_Item):
    """One row of the per-iteration table."""

    iteration: int
    train_rows: int
    coverage_rows: int
    synthetic_rows: int
    usd: float = Field(description="Service-LLM dollars charged to the iteration (its synthesis and judging).")
    cumulative_usd: float
    scores: dict[Metric, MetricPoint] = Field(description="Empty when the iteration was not evaluated.")
    failed_judgments: int
    decision: Decision | None

    @property
    def evaluated(self) -> bool:
        """Whether the iteration has scores."""
        return bool(self.scores)


class JudgeNote(_Item):
    """One judge call on an example response."""

    judge_model: str
    repeat: int
    similarity: float | None
    precision: float | None
    reason: str
    error: str | None


class Example(_Item):
    """One response of the fine-tuned model with its prompt, the human reference answer and the judges' view."""

    index: int = Field(description="Row of the test split.")
    response_index: int
    category: str | None
    prompt: str
    response: str
    reference: str | None = Field(description="None when the test split could not be read.")
    score: float = Field(description="Mean over the metrics of the response's combined judge scores.")
    scores: dict[Metric, float]
    judgments: list[JudgeNote]


class Serving(_Item):
    """The adapter to deploy and how to serve it."""

    iteration: int
    graduated: bool
    base_model: str
    adapter: ArtifactRef
    model_name: str = Field(description="The name clients ask for: the migration id.")
    serve_command: str
    client_change: str
    client_model: str


class ReportData(_Item):
    """Everything a migration report shows, independent of how it is rendered."""

    migration_id: str
    task_name: str
    status: Status
    failure_reason: str | None
    failure_detail: str | None
    created_at: datetime
    updated_at: datetime
    base_model: str
    metrics: list[Metric]
    thresholds: dict[Metric, float]
    gate: Literal["mean", "lower_ci"]
    iterations: list[IterationRow]
    total_spend: Spend
    best_iteration: int | None = Field(description="The graduated iteration, else the best scored one.")
    best_examples: list[Example]
    worst_examples: list[Example]
    serving: Serving | None
    break_even: BreakEven
    notes: list[str] = Field(default_factory=list, description="Artifacts the report could not read.")


def chosen_iteration(state: MigrationState) -> IterationRecord | None:
    """The iteration whose adapter is the result: the graduated one, else the best scored one (`state.best()`)."""
    graduated = [item for item in state.iterations if item.decision == "graduated" and item.adapter]
    return graduated[-1] if graduated else state.best()


def report_metrics(state: MigrationState) -> list[Metric]:
    """The thresholded metrics, then any other metric an iteration was scored on."""
    metrics: list[Metric] = list(state.spec.evaluation.thresholds)
    for record in state.iterations:
        metrics.extend(metric for metric in record.scores or {} if metric not in metrics)
    return metrics


def iteration_rows(state: MigrationState) -> list[IterationRow]:
    """The per-iteration table, in iteration order."""
    thresholds = state.spec.evaluation.thresholds
    rows: list[IterationRow] = []
    cumulative = 0.0
    for record in sorted(state.iterations, key=lambda item: item.iteration):
        cumulative += record.spend.usd
        rows.append(
            IterationRow(
                iteration=record.iteration,
                train_rows=record.train_rows,
                coverage_rows=record.train_rows - record.synthetic_rows,
                synthetic_rows=record.synthetic_rows,
                usd=record.spend.usd,
                cumulative_usd=cumulative,
                scores={
                    metric: MetricPoint(
                        mean=summary.mean,
                        ci_low=summary.ci_low,
                        ci_high=summary.ci_high,
                        judged=summary.judged,
                        threshold=thresholds.get(metric),
                    )
                    for metric, summary in (record.scores or {}).items()
                },
                failed_judgments=record.failed_judgments,
                decision=record.decision,
            )
        )
    return rows


def response_scores(
    judgments: Sequence[Judgment], metrics: Sequence[Metric], combine: Literal["mean", "strictest"] = "mean"
) -> dict[ResponseKey, dict[Metric, float]]:
    """Per response, per metric: each judge's mean over its valid repeats, combined over the panel like the judge.

    `combine` is the spec's: the judges' mean, or the lowest (`strictest`). Failed judgments have no say.
    """
    repeats: dict[tuple[Metric, ResponseKey, str], list[float]] = defaultdict(list)
    for judgment in judgments:
        for metric in metrics:
            value = getattr(judgment, metric)
            if judgment.error is None and value is not None:
                repeats[(metric, (judgment.index, judgment.response_index), judgment.judge_model)].append(value)
    panel: dict[tuple[ResponseKey, Metric], list[float]] = defaultdict(list)
    for (metric, key, _), values in repeats.items():
        panel[(key, metric)].append(statistics.fmean(values))
    scores: dict[ResponseKey, dict[Metric, float]] = {}
    for key in sorted({key for key, _ in panel}):
        scores[key] = {}
        for metric in metrics:
            judged = panel.get((key, metric))
            if judged:
                scores[key][metric] = min(judged) if combine == "strictest" else statistics.fmean(judged)
    return scores


def rank_examples(
    scores: dict[ResponseKey, dict[Metric, float]], count: int = EXAMPLES_SHOWN
) -> tuple[list[ResponseKey], list[ResponseKey]]:
    """The `count` best responses (best first) and the `count` worst of the rest (worst first), by mean score.

    Ties go to the lower test-row index, then the lower response index, so the choice is deterministic.
    """
    overall = {key: statistics.fmean(values.values()) for key, values in scores.items() if values}
    best = sorted(overall, key=lambda key: (-overall[key], key))[:count]
    rest = [key for key in overall if key not in best]
    worst = sorted(rest, key=lambda key: (overall[key], key))[:count]
    return best, worst


def _judge_notes(judgments: Sequence[Judgment]) -> dict[ResponseKey, list[JudgeNote]]:
    notes: dict[ResponseKey, list[JudgeNote]] = defaultdict(list)
    for judgment in sorted(judgments, key=lambda j: (j.judge_model, j.repeat)):
        notes[(judgment.index, judgment.response_index)].append(
            JudgeNote(
                judge_model=judgment.judge_model,
                repeat=judgment.repeat,
                similarity=judgment.similarity,
                precision=judgment.precision,
                reason=judgment.reason,
                error=judgment.error,
            )
        )
    return notes


def _examples(
    files: IterationFiles,
    record: IterationRecord,
    test_rows: list[ChatRow] | None,
    metrics: Sequence[Metric],
    combine: Literal["mean", "strictest"],
) -> tuple[list[Example], list[Example]]:
    if record.judgments is None:
        return [], []
    judged: ArtifactRef = record.judgments
    judgments = files.read(judged, lambda data: load_models(data, Judgment, judged.uri), JUDGMENTS.label)
    responses_ref = files.head(RESPONSES)
    answers = (
        files.read(responses_ref, lambda data: load_models(data, PromptResponses, RESPONSES.label), RESPONSES.label)
        if responses_ref is not None
        else None
    )
    if judgments is None or answers is None:
        return [], []
    by_index = {item.index: item for item in answers}
    scores = response_scores(judgments, metrics, combine)
    notes = _judge_notes(judgments)

    def example(key: ResponseKey) -> Example | None:
        index, response_index = key
        answer = by_index.get(index)
        if answer is None or response_index >= len(answer.responses):
            files.problems.append(f"judged response {key} is not in {RESPONSES.label}")
            return None
        row = test_rows[index] if test_rows is not None and index < len(test_rows) else None
        return Example(
            index=index,
            response_index=response_index,
            category=row.category if row else None,
            prompt=answer.prompt,
            response=answer.responses[response_index].text,
            reference=row.reference if row else None,
            score=statistics.fmean(scores[key].values()),
            scores=scores[key],
            judgments=notes[key],
        )

    best, worst = rank_examples(scores)
    return (
        [item for item in map(example, best) if item is not None],
        [item for item in map(example, worst) if item is not None],
    )


def serving_for(state: MigrationState, record: IterationRecord) -> Serving | None:
    """How to serve the adapter of `record`: the `llamaduo serve` command and the client change."""
    if record.adapter is None:
        return None
    base = state.spec.base_model.id
    name = state.migration_id
    command = shlex.join(["llamaduo", "serve", "--model", base, "--adapter", f"{name}={record.adapter.uri}"])
    return Serving(
        iteration=record.iteration,
        graduated=record.decision == "graduated",
        base_model=base,
        adapter=record.adapter,
        model_name=name,
        serve_command=command,
        client_change=f'OpenAI(base_url="{SERVE_BASE_URL}")',
        client_model=f'model="{name}"',
    )


def build_report_data(state: MigrationState, store: ArtifactStore, *, gpu_usd_per_hour: float = 2.0) -> ReportData:
    """Assemble the report of a migration from its state and its artifacts.

    Artifacts that are absent or unreadable leave their part of the report empty and are listed in `notes`; a
    migration with no evaluated iteration still has its table, its spend and an unmeasurable break-even.
    """
    metrics = report_metrics(state)
    chosen = chosen_iteration(state)
    notes: list[str] = []
    best_examples: list[Example] = []
    worst_examples: list[Example] = []
    throughput: float | None = None
    backend: str | None = None
    device: str | None = None
    if chosen is not None:
        files = IterationFiles(store, state.migration_id, chosen.iteration)
        test_rows = None
        if state.test is not None:
            test_rows = files.read(state.test, lambda data: parse_jsonl(data, "test split"), "test split")
        best_examples, worst_examples = _examples(files, chosen, test_rows, metrics, state.spec.evaluation.combine)
        found = files.json(INFERENCE)
        if found is not None:
            summary = found[1]
            rate = summary.get("completion_tokens_per_second")
            throughput = float(rate) if isinstance(rate, int | float) else None
            backend = str(summary["backend"]) if summary.get("backend") else None
            device = str(summary["device"]) if summary.get("device") else None
        notes.extend(f"iteration {chosen.iteration}: {label} is absent" for label in files.absent)
        notes.extend(f"iteration {chosen.iteration}: {problem}" for problem in files.problems)
    return ReportData(
        migration_id=state.migration_id,
        task_name=state.spec.task.name,
        status=state.status,
        failure_reason=state.failure_reason,
        failure_detail=state.failure_detail,
        created_at=state.created_at,
        updated_at=state.updated_at,
        base_model=state.spec.base_model.id,
        metrics=metrics,
        thresholds=state.spec.evaluation.thresholds,
        gate=state.spec.evaluation.gate,
        iterations=iteration_rows(state),
        total_spend=state.spend,
        best_iteration=chosen.iteration if chosen else None,
        best_examples=best_examples,
        worst_examples=worst_examples,
        serving=serving_for(state, chosen) if chosen else None,
        break_even=estimate_break_even(
            state.spend,
            throughput,
            gpu_usd_per_hour,
            backend=backend,
            device=device,
            iteration=chosen.iteration if chosen else None,
        ),
        notes=notes,
    )
