"""`llamaduo watch`'s view and the progress bookkeeping behind it and behind the coordinator's status endpoint."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from llamaduo.cli.render import format_duration
from llamaduo.cli.watch import watch_view
from llamaduo.client import ProgressTracker, StageProgress, current_stage, migration_eta
from llamaduo.contract import ArtifactRef, MetricSummary, MigrationSpec, Progress, Spend
from llamaduo.state import IterationRecord, MigrationState

T0 = datetime(2025, 1, 2, 12, 0, 0, tzinfo=UTC)
REF = ArtifactRef(uri="file:///tmp/x", sha256="0" * 64, size=1)


def summary(mean: float, low: float | None = None, high: float | None = None) -> MetricSummary:
    return MetricSummary(mean=mean, median=mean, share_ge_50=1.0, share_ge_70=0.5, judged=8, ci_low=low, ci_high=high)


def state_for(status: str = "running", **updates: object) -> MigrationState:
    spec = MigrationSpec.model_validate(
        {
            "task": {"name": "commit messages"},
            "coverage": {"uri": "file:///tmp/c.jsonl"},
            "budgets": {"max_iterations": 4, "max_cost_usd": 2.5},
        }
    )
    iterations = [
        IterationRecord(
            iteration=0,
            dataset=REF,
            train_rows=100,
            synthetic_rows=0,
            adapter=REF,
            scores={"similarity": summary(72.34, 68.1, 76.04), "precision": summary(65.0)},
            spend=Spend(calls=8, usd=0.12),
            decision="need_more_data",
        ),
        IterationRecord(iteration=1, dataset=REF, train_rows=164, synthetic_rows=64, spend=Spend(calls=12, usd=0.22)),
    ]
    fields: dict[str, object] = {
        "migration_id": "commit-msg-1",
        "spec": spec,
        "status": status,
        "iteration": 1,
        "iterations": iterations,
        "spend": Spend(calls=20, cached_calls=3, usd=0.34, prompt_tokens=1000, completion_tokens=500),
        "created_at": T0 - timedelta(minutes=10),
        "updated_at": T0 - timedelta(seconds=20),
    }
    fields.update(updates)
    return MigrationState.model_validate(fields)


def stage(
    service: str = "trainer",
    name: str = "training",
    done: int = 30,
    total: int | None = 100,
    ago_s: float = 5.0,
    eta_s: float | None = 40.0,
    **extra: object,
) -> StageProgress:
    return StageProgress.model_validate(
        {
            "service": service,
            "stage": name,
            "iteration": 1,
            "done": done,
            "total": total,
            "observed_at": T0 - timedelta(seconds=ago_s),
            "rate_per_s": 1.75 if eta_s else None,
            "eta_s": eta_s,
            **extra,
        }
    )


def text_of(renderable: object, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_a_running_migration_shows_its_stage_bar_eta_iterations_and_totals() -> None:
    progress = [stage("synthesizer", "synthesis", done=64, total=64, ago_s=300, eta_s=None), stage()]
    text = text_of(watch_view(state_for(), progress, T0))
    assert "migration commit-msg-1  RUNNING  iteration 1 (max 4)  stage trainer/training" in text
    assert "running for 10m 00s" in text
    # The current stage is the one heard of last; its ETA counts down from when it was heard.
    assert "trainer/training (iteration 1)" in text and "30/100 (30%)" in text
    assert "ETA 35s" in text and "1.75/s" in text and "updated 5s ago" in text
    assert "synthesizer/synthesis" not in text
    # Iterations: rows, scores with their CI, decision, dollars; thresholds in the headers.
    assert "similarity (>= 90)" in text and "precision (>= 90)" in text
    assert "72.3 [68.1, 76.0]" in text and "65.0" in text
    assert "need_more_data" in text and "$0.1200" in text
    row1 = next(line for line in text.splitlines() if "164" in line)
    assert "64" in row1 and "in progress" in row1 and "$0.2200" in row1
    assert "totals: 164 training rows (64 synthetic), $0.3400 of $2.50 over 20 service-LLM calls, 3 cached" in text
    assert "1500 tokens" in text


def test_a_failed_migration_shows_its_reason_and_no_live_stage() -> None:
    state = state_for("failed", failure_reason="budget:iterations", failure_detail="4 iterations used")
    text = text_of(watch_view(state, [stage()], T0))
    assert "FAILED" in text and "ended 20s ago" in text
    assert "failed: budget:iterations: 4 iterations used" in text
    assert "ETA" not in text and "stage trainer/training" not in text
    assert migration_eta(state, [stage()], T0) is None


def test_without_progress_the_view_says_so_and_shows_why() -> None:
    note = "no coordinator is running; state read from KV, no live progress"
    text = text_of(watch_view(state_for(iterations=[], iteration=0), [], T0, note=note))
    assert "no progress heard yet" in text
    assert note in text
    assert "totals: 0 training rows (0 synthetic)" in text
    assert "train rows" not in text  # no iterations table before the first iteration


@pytest.mark.parametrize(
    ("entry", "expected", "absent"),
    [
        (stage(total=None, eta_s=None, done=3), "ETA unknown", "%"),
        (stage(done=100, total=100, eta_s=0.0), "stage done", "ETA"),
        (stage(eta_s=2.0, ago_s=30), "ETA 0s", "ETA -"),
    ],
)
def test_stage_lines_for_unknown_totals_finished_and_overdue_stages(
    entry: StageProgress, expected: str, absent: str
) -> None:
    text = text_of(watch_view(state_for(), [entry], T0))
    assert expected in text
    assert absent not in text.split("totals")[0]


def test_text_from_the_bus_is_shown_verbatim_not_as_markup() -> None:
    entry = stage(message="[bold]loading[/bold] data")
    text = text_of(watch_view(state_for(), [entry], T0))
    assert "[bold]loading[/bold] data" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (44.6, "45s"), (65, "1m 05s"), (3600, "1h 00m"), (49 * 3600, "2d 1h"), (-3, "0s")],
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def progress(done: int, total: int | None = 10, iteration: int = 0, migration: str = "mig-1", **kw: object) -> Progress:
    fields: dict[str, object] = {
        "migration_id": migration,
        "iteration": iteration,
        "service": "inferencer",
        "stage": "inference",
        "done": done,
        "total": total,
    }
    fields.update(kw)
    return Progress.model_validate(fields)


def test_the_tracker_measures_a_stage_rate_and_restarts_it_on_a_new_run() -> None:
    tracker = ProgressTracker()
    first = tracker.observe(progress(2), T0)
    assert first.rate_per_s is None and first.eta_s is None  # one point: no rate yet
    entry = tracker.observe(progress(6), T0 + timedelta(seconds=2))
    assert entry.rate_per_s == pytest.approx(2.0) and entry.eta_s == pytest.approx(2.0)
    assert entry.eta_at(T0 + timedelta(seconds=3)) == pytest.approx(1.0)
    assert entry.eta_at(T0 + timedelta(seconds=60)) == 0.0
    # A redelivered task starts over: the rate is measured again from its first event.
    restarted = tracker.observe(progress(1), T0 + timedelta(seconds=10))
    assert restarted.rate_per_s is None
    again = tracker.observe(progress(2), T0 + timedelta(seconds=14))
    assert again.rate_per_s == pytest.approx(0.25)
    # A new iteration is a new run too, and the latest per (service, stage) replaces the old one.
    tracker.observe(progress(5, iteration=1), T0 + timedelta(seconds=20))
    [only] = tracker.snapshot("mig-1")
    assert (only.iteration, only.done, only.rate_per_s) == (1, 5, None)
    assert tracker.observe(progress(10, iteration=1), T0 + timedelta(seconds=21)).eta_s == 0.0


def test_the_tracker_keeps_stages_apart_and_the_last_heard_is_current() -> None:
    tracker = ProgressTracker()
    tracker.observe(progress(3, service="trainer", stage="training"), T0)
    tracker.observe(progress(1, service="judge", stage="judging"), T0 + timedelta(seconds=1))
    tracker.observe(progress(9, migration="other"), T0 + timedelta(seconds=2))
    entries = tracker.snapshot("mig-1")
    assert [(e.service, e.stage) for e in entries] == [("trainer", "training"), ("judge", "judging")]
    current = current_stage(entries)
    assert current is not None and current.stage == "judging"
    assert tracker.snapshot("unknown") == []


def test_ended_migrations_are_forgotten_after_a_while_unless_resumed() -> None:
    tracker = ProgressTracker(ended_ttl_s=60, idle_ttl_s=3600)
    tracker.observe(progress(1, migration="done"), T0)
    tracker.observe(progress(1, migration="resumed"), T0)
    tracker.observe(progress(1, migration="running"), T0)
    tracker.ended("done", T0)
    tracker.ended("resumed", T0)
    tracker.ended("never-heard-of", T0)
    assert tracker.prune(T0 + timedelta(seconds=59)) == 0
    tracker.observe(progress(2, migration="resumed"), T0 + timedelta(seconds=30))  # progress again: it goes on
    assert tracker.prune(T0 + timedelta(seconds=61)) == 1
    assert "done" not in tracker and "resumed" in tracker and "running" in tracker
    # Silent migrations go after the idle limit.
    assert tracker.prune(T0 + timedelta(seconds=3601)) == 1
    assert "running" not in tracker and "resumed" in tracker


def test_the_tracker_is_bounded() -> None:
    tracker = ProgressTracker(max_migrations=3, max_stages=2)
    for i in range(5):
        tracker.observe(progress(1, migration=f"mig-{i}"), T0 + timedelta(seconds=i))
    assert len(tracker) == 3 and "mig-0" not in tracker and "mig-1" not in tracker and "mig-4" in tracker
    for i, name in enumerate(("a", "b", "c")):
        tracker.observe(progress(1, migration="mig-4", stage=name), T0 + timedelta(seconds=10 + i))
    assert [e.stage for e in tracker.snapshot("mig-4")] == ["b", "c"]


def test_merging_another_observers_entries_keeps_the_newer_one() -> None:
    tracker = ProgressTracker()
    tracker.observe(progress(5, iteration=1), T0)
    behind = stage("inferencer", "inference", done=3, ago_s=0)
    ahead = stage("judge", "judging", done=7, ago_s=0)
    tracker.merge("mig-1", [behind, ahead], T0)
    by_stage = {e.stage: e for e in tracker.snapshot("mig-1")}
    assert by_stage["inference"].done == 5 and by_stage["judging"].done == 7
    tracker.merge("mig-1", [stage("inferencer", "inference", done=1, iteration=2)], T0)
    assert {e.stage: e for e in tracker.snapshot("mig-1")}["inference"].iteration == 2


def test_a_resume_request_gets_an_event_line() -> None:
    from llamaduo.cli.render import describe
    from llamaduo.contract import MigrationResume
    from llamaduo.contract.spec import BudgetSpec

    event = MigrationResume(
        migration_id="mig-1", request_id="abc", budgets=BudgetSpec(max_iterations=6), reason="more rounds"
    )
    line = describe(event)
    assert line is not None and line.startswith("resume requested with budgets {'max_iterations': 6")
    assert line.endswith(": more rounds")
