"""The graduation rule and the budgets: pure functions of the spec, the state and the scores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    """The paper's gate: every thresholded metric's mean reaches its threshold."""
    missing = [metric for metric in spec.evaluation.thresholds if metric not in scores or not scores[metric].judged]
    if missing:
        return False, f"no valid judgments for {', '.join(missing)}"
    short = [
        f"{metric} {scores[metric].mean:.1f} < {threshold:g}"
        for metric, threshold in spec.evaluation.thresholds.items()
        if scores[metric].mean < threshold
    ]
    return not short, "; ".join(short) or "every metric reached its threshold"


def decide(
    spec: MigrationSpec, iteration: int, scores: Mapping[Metric, MetricSummary], spend: Spend, synthetic_rows: int
) -> Verdict:
    """Graduate, ask for more data, or stop on a budget."""
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
