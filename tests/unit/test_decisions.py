"""The coordinator's decision after an evaluation."""

from llamaduo.contract import MetricSummary, MigrationSpec, Spend
from llamaduo_coordinator.decisions import decide


def spec(**budgets: object) -> MigrationSpec:
    return MigrationSpec.model_validate(
        {
            "task": {"name": "t"},
            "coverage": {"uri": "x"},
            "evaluation": {"thresholds": {"similarity": 70, "precision": 60}},
            "synthesis": {"first_round_rows": 8},
            "budgets": {"max_iterations": 3, **budgets},
        }
    )


def scores(similarity: float, precision: float, judged: int = 10) -> dict:
    def summary(mean: float) -> MetricSummary:
        return MetricSummary(mean=mean, median=mean, share_ge_50=1.0, share_ge_70=0.5, judged=judged)

    return {"similarity": summary(similarity), "precision": summary(precision)}


def test_graduates_when_every_mean_reaches_its_threshold():
    assert decide(spec(), 0, scores(70, 60), Spend(), 0).action == "graduated"


def test_one_metric_short_asks_for_more_data_doubling_each_round():
    first = decide(spec(), 0, scores(90, 59.9), Spend(), 0)
    assert (first.action, first.new_rows) == ("need_more_data", 8)
    assert "precision 59.9 < 60" in first.detail
    assert decide(spec(), 1, scores(90, 10), Spend(), 8).new_rows == 16


def test_fails_at_the_iteration_limit():
    verdict = decide(spec(), 2, scores(10, 10), Spend(), 24)
    assert (verdict.action, verdict.reason) == ("failed", "budget:iterations")


def test_no_valid_judgments_never_graduates():
    verdict = decide(spec(), 0, scores(100, 100, judged=0), Spend(), 0)
    assert verdict.action == "need_more_data"
    assert "no valid judgments" in verdict.detail


def test_synthetic_row_and_cost_caps():
    assert decide(spec(max_synthetic_rows=8), 1, scores(1, 1), Spend(), 8).reason == "budget:synthetic_rows"
    assert decide(spec(max_synthetic_rows=10), 1, scores(1, 1), Spend(), 8).new_rows == 2
    assert decide(spec(max_cost_usd=1.0), 0, scores(1, 1), Spend(usd=1.5), 0).reason == "budget:cost"


def gated(gate: str, min_judged: int = 1) -> MigrationSpec:
    base = spec()
    evaluation = base.evaluation.model_copy(update={"gate": gate, "min_judged": min_judged})
    return base.model_copy(update={"evaluation": evaluation})


def with_ci(mean: float, low: float, judged: int = 10) -> dict:
    summary = MetricSummary(
        mean=mean, median=mean, share_ge_50=1.0, share_ge_70=0.5, judged=judged, ci_low=low, ci_high=mean + 5
    )
    return {"similarity": summary, "precision": summary}


def test_the_statistical_gate_needs_the_lower_bound_above_the_threshold():
    assert decide(gated("mean"), 0, with_ci(75, 65), Spend(), 0).action == "graduated"
    verdict = decide(gated("lower_ci"), 0, with_ci(75, 65), Spend(), 0)
    assert verdict.action == "need_more_data" and "similarity CI lower bound 65.0 < 70" in verdict.detail
    assert decide(gated("lower_ci"), 0, with_ci(80, 72), Spend(), 0).action == "graduated"


def test_too_few_judged_responses_never_graduate():
    verdict = decide(gated("mean", min_judged=20), 0, with_ci(99, 98, judged=19), Spend(), 0)
    assert verdict.action == "need_more_data" and "19 judged responses < min_judged 20" in verdict.detail
