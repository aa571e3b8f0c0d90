"""The graduation rule and the budgets: pure functions of the spec, the state and the scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from llamaduo.contract import MetricSummary, MigrationSpec, Spend
from llamaduo.contract.spec import Metric


@dataclass(frozen=True)
class Verdict:
    """What to do after an evaluation."""

    action: Literal["graduated", "need_more_data", "failed"]
    reason: str = ""
    detail: str = ""
    new_rows: int = 0


def passes(spec: MigrationSpec, scores: Mapping[Metric, MetricSummary]) -> tuple[bool, str]:
    """The gate the spec chose: every thresholded metric's mean (the paper's rule), or its lower CI bound, reaches
    its threshold, over at least `min_judged` validly judged responses."""
    evaluation = spec.evaluation
    missing = [metric for metric in evaluation.thresholds if metric not in scores or not scores[metric].judged]
    if missing:
        return False, f"no valid judgments for {', '.join(missing)}"
    thin = [
        f"{metric} has {scores[metric].judged} judged responses < min_judged {evaluation.min_judged}"
        for metric in evaluation.thresholds
        if scores[metric].judged < evaluation.min_judged
    ]
    if thin:
        return False, "; ".join(thin)
    short = []
    for metric, threshold in evaluation.thresholds.items():
        summary = scores[metric]
        if evaluation.gate == "lower_ci":
            if summary.ci_low is None:
                short.append(f"{metric} has no confidence interval")
            elif summary.ci_low < threshold:
                short.append(f"{metric} CI lower bound {summary.ci_low:.1f} < {threshold:g}")
        elif summary.mean < threshold:
            short.append(f"{metric} {summary.mean:.1f} < {threshold:g}")
    return not short, "; ".join(short) or "every metric reached its threshold"


def improved(
    spec: MigrationSpec, earlier: Sequence[Mapping[Metric, MetricSummary]], scores: Mapping[Metric, MetricSummary]
) -> bool:
    """Whether `scores` beat every earlier iteration beyond its confidence interval on at least one gated metric.

    The best earlier iteration (highest worst-metric mean) is the bar: a metric improves when its mean passes that
    iteration's upper CI bound (its mean, when it has no CI). The first iteration always counts as improvement.
    """
    metrics = list(spec.evaluation.thresholds) or list(scores)
    scored = [item for item in earlier if all(metric in item for metric in metrics)]
    if not scored:
        return True
    best = max(scored, key=lambda item: min(item[metric].mean for metric in metrics))
    for metric in metrics:
        if metric not in scores:
            continue
        high = best[metric].ci_high
        if scores[metric].mean > (high if high is not None else best[metric].mean):
            return True
    return False


def stalled_iterations(spec: MigrationSpec, history: Sequence[Mapping[Metric, MetricSummary]]) -> int:
    """How many iterations in a row, ending with the last of `history`, brought no improvement."""
    run = 0
    for position in range(len(history) - 1, -1, -1):
        if improved(spec, history[:position], history[position]):
            break
        run += 1
    return run


def past_deadline(spec: MigrationSpec, started: datetime, now: datetime) -> bool:
    """Whether the migration's wall-clock deadline has passed."""
    minutes = spec.budgets.deadline_minutes
    return minutes is not None and now - started >= timedelta(minutes=minutes)


def decide(
    spec: MigrationSpec,
    iteration: int,
    scores: Mapping[Metric, MetricSummary],
    spend: Spend,
    synthetic_rows: int,
    *,
    earlier: Sequence[Mapping[Metric, MetricSummary]] = (),
    started: datetime | None = None,
    now: datetime | None = None,
) -> Verdict:
    """Graduate, ask for more data, or stop on a budget, the plateau rule or the deadline.

    `earlier` holds the scores of the iterations before this one, in order; `started` is when the migration was
    requested (for the deadline).
    """
    ok, detail = passes(spec, scores)
    if ok:
        return Verdict("graduated", detail=detail)
    budgets = spec.budgets
    if iteration + 1 >= budgets.max_iterations:
        return Verdict(
            "failed", "budget:iterations", f"{detail}; {budgets.max_iterations} iteration(s) used, none graduated"
        )
    if budgets.max_cost_usd is not None and spend.usd >= budgets.max_cost_usd:
        return Verdict("failed", "budget:cost", f"{detail}; spent ${spend.usd:.4f} of ${budgets.max_cost_usd:.4f}")
    if budgets.plateau_iterations is not None:
        stalled = stalled_iterations(spec, [*earlier, scores])
        if stalled >= budgets.plateau_iterations:
            return Verdict(
                "failed",
                "plateau",
                f"{detail}; {stalled} iteration(s) in a row without a metric above the best earlier iteration's "
                "confidence interval",
            )
    if started is not None and past_deadline(spec, started, now or datetime.now(UTC)):
        return Verdict("failed", "deadline", f"{detail}; the deadline of {budgets.deadline_minutes:g} minutes passed")
    new_rows = spec.rows_for_round(iteration)
    if budgets.max_synthetic_rows is not None:
        new_rows = min(new_rows, budgets.max_synthetic_rows - synthetic_rows)
        if new_rows <= 0:
            return Verdict(
                "failed",
                "budget:synthetic_rows",
                f"{detail}; {synthetic_rows} synthetic rows reach the cap of {budgets.max_synthetic_rows}",
            )
    return Verdict("need_more_data", detail=detail, new_rows=new_rows)
