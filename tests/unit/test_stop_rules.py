"""The coordinator's stop rules as pure functions: plateau beyond the confidence interval, and the deadline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from llamaduo.contract import MetricSummary, MigrationSpec, Spend
from llamaduo_coordinator.decisions import decide, improved, stalled_iterations


def spec(**budgets: object) -> MigrationSpec:
    return MigrationSpec.model_validate(
        {
            "task": {"name": "t"},
            "coverage": {"uri": "u"},
            "evaluation": {"thresholds": {"similarity": 90, "precision": 90}},
            "budgets": {"max_iterations": 10, **budgets},
        }
    )


def scores(mean: float, half_width: float = 3.0) -> dict[str, MetricSummary]:
    summary = MetricSummary(
        mean=mean,
        median=mean,
        share_ge_50=1,
        share_ge_70=0,
        judged=20,
        ci_low=mean - half_width,
        ci_high=mean + half_width,
    )
    return {"similarity": summary, "precision": summary}


def test_improvement_means_passing_the_best_earlier_iterations_upper_bound() -> None:
    s = spec()
    assert improved(s, [], scores(50))
    assert improved(s, [scores(50)], scores(54))  # above 50 + 3
    assert not improved(s, [scores(50)], scores(52))  # inside the interval: noise
    assert not improved(s, [scores(50), scores(60)], scores(58))  # the best earlier one is the bar
    assert stalled_iterations(s, [scores(50), scores(55), scores(56), scores(57)]) == 2


def test_the_plateau_rule_fails_after_k_stalled_iterations() -> None:
    s = spec(plateau_iterations=2)
    history = [scores(50), scores(51)]
    first = decide(s, 1, history[1], Spend(), 0, earlier=history[:1])
    assert first.action == "need_more_data"
    second = decide(s, 2, scores(52), Spend(), 0, earlier=history)
    assert (second.action, second.reason) == ("failed", "plateau")
    assert "2 iteration(s) in a row" in second.detail
    # A real step up resets the count.
    assert decide(s, 2, scores(60), Spend(), 0, earlier=history).action == "need_more_data"


def test_the_deadline_fails_a_decision_taken_after_it_but_never_a_graduation() -> None:
    s = spec(deadline_minutes=30)
    started = datetime(2026, 1, 1, tzinfo=UTC)
    late = started + timedelta(minutes=31)
    verdict = decide(s, 0, scores(50), Spend(), 0, started=started, now=late)
    assert (verdict.action, verdict.reason) == ("failed", "deadline")
    assert decide(s, 0, scores(50), Spend(), 0, started=started, now=started + timedelta(minutes=29)).action == (
        "need_more_data"
    )
    assert decide(s, 0, scores(95, 1), Spend(), 0, started=started, now=late).action == "graduated"


def test_lora_shape_defaults_follow_the_papers_runs_by_model_size() -> None:
    from llamaduo.contract.spec import LoraSpec, lora_shape

    assert lora_shape(LoraSpec(), 135_000_000) == (8, 16)
    assert lora_shape(LoraSpec(), 2_000_000_000) == (8, 16)
    assert lora_shape(LoraSpec(), 8_000_000_000) == (32, 64)
    assert lora_shape(LoraSpec(r=16), 8_000_000_000) == (16, 32)
    assert lora_shape(LoraSpec(r=4, alpha=4), 1) == (4, 4)
