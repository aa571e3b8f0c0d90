"""`llamaduo watch`: a live view of one migration until it ends.

The view is a pure function of (state, latest progress per stage, now) — `watch_view` — so it can be tested
without a bus. `watch` feeds it: it follows the migration's events (progress updates the view at once, any other
event triggers a status refresh) and asks the status endpoint again every few seconds. Leaving the view (Ctrl-C)
never touches the migration.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from llamaduo.cli.render import format_duration
from llamaduo.client import Client, ProgressTracker, StageProgress, StatusReport, current_stage
from llamaduo.contract import Event, MetricSummary, Progress
from llamaduo.contract.spec import Metric
from llamaduo.state import IterationRecord, MigrationState, utcnow
from llamaduo.telemetry import get_logger

log = get_logger(__name__)

STATUS_STYLE = {
    "accepted": "cyan",
    "running": "bold cyan",
    "graduated": "bold green",
    "failed": "bold red",
    "cancelled": "bold yellow",
}


def score_cell(summary: MetricSummary | None) -> str:
    """A metric's mean with its confidence interval when known: `72.3 [68.1, 76.0]`."""
    if summary is None:
        return "-"
    if summary.ci_low is not None and summary.ci_high is not None:
        return f"{summary.mean:.1f} [{summary.ci_low:.1f}, {summary.ci_high:.1f}]"
    return f"{summary.mean:.1f}"


def _metrics(state: MigrationState) -> list[Metric]:
    names: list[Metric] = list(state.spec.evaluation.thresholds)
    for record in state.iterations:
        for metric in record.scores or {}:
            if metric not in names:
                names.append(metric)
    return names


def iterations_table(state: MigrationState) -> Table:
    """One row per iteration: rows trained on, scores with CI per metric, the decision and its dollars."""
    thresholds = state.spec.evaluation.thresholds
    metrics = _metrics(state)
    table = Table(title="iterations", title_justify="left", expand=False)
    table.add_column("iter", justify="right")
    table.add_column("train rows", justify="right")
    table.add_column("synthetic", justify="right")
    for metric in metrics:
        threshold = thresholds.get(metric)
        table.add_column(f"{metric} (>= {threshold:g})" if threshold is not None else metric, justify="right")
    table.add_column("decision")
    table.add_column("spend", justify="right")

    def row(record: IterationRecord) -> list[str]:
        scores = record.scores or {}
        decision: str = record.decision or ("in progress" if not state.terminal else "-")
        if record.failed_judgments:
            decision = f"{decision} ({record.failed_judgments} judgments failed)"
        return [
            str(record.iteration),
            str(record.train_rows),
            str(record.synthetic_rows),
            *(score_cell(scores.get(metric)) for metric in metrics),
            decision,
            f"${record.spend.usd:.4f}",
        ]

    for record in sorted(state.iterations, key=lambda item: item.iteration):
        table.add_row(*row(record))
    return table


def _header(state: MigrationState, current: StageProgress | None, now: datetime) -> Text:
    budgets = state.spec.budgets
    header = Text.assemble(
        ("migration ", "bold"),
        (state.migration_id, "bold"),
        "  ",
        (state.status.upper(), STATUS_STYLE.get(state.status, "bold")),
        f"  iteration {state.iteration} (max {budgets.max_iterations})",
    )
    if state.spec.resumed:
        header.append(f"  resumed {state.spec.resumed}x")
    if current is not None and not state.terminal:
        header.append(f"  stage {current.service}/{current.stage}")
    if state.terminal:
        header.append(f"  ended {format_duration((now - state.updated_at).total_seconds())} ago")
    else:
        header.append(f"  running for {format_duration((now - state.created_at).total_seconds())}")
    return header


def progress_line(entry: StageProgress, now: datetime) -> Table:
    """The current stage: label, bar, done/total, rate and time left."""
    grid = Table.grid(padding=(0, 1))
    label = f"{entry.service}/{entry.stage}"
    if entry.iteration is not None:
        label += f" (iteration {entry.iteration})"
    if entry.total:
        counts = f"{entry.done}/{entry.total} ({100 * (entry.fraction or 0):.0f}%)"
    else:
        counts = f"{entry.done}" + ("" if entry.total is None else "/0")
    eta = entry.eta_at(now)
    if entry.total is not None and entry.done >= entry.total:
        when = "stage done"
    elif eta is not None:
        when = f"ETA {format_duration(eta)}"
    else:
        when = "ETA unknown"
    rate = f"{entry.rate_per_s:.2f}/s" if entry.rate_per_s else ""
    ago = f"updated {format_duration((now - entry.observed_at).total_seconds())} ago"
    bar = ProgressBar(total=float(entry.total) if entry.total else None, completed=float(entry.done), width=30)
    grid.add_row(Text(label), bar, Text(counts), Text(when, style="bold"), Text(rate), Text(ago, style="dim"))
    if entry.message:
        grid.add_row(Text(entry.message, style="dim"))
    return grid


def _totals(state: MigrationState) -> Text:
    latest = max(state.iterations, key=lambda item: item.iteration, default=None)
    rows = latest.train_rows if latest else 0
    synthetic = latest.synthetic_rows if latest else 0
    spend = state.spend
    budgets = state.spec.budgets
    dollars = f"${spend.usd:.4f}" + (f" of ${budgets.max_cost_usd:.2f}" if budgets.max_cost_usd is not None else "")
    cached = f", {spend.cached_calls} cached" if spend.cached_calls else ""
    return Text(
        f"totals: {rows} training rows ({synthetic} synthetic), {dollars} over {spend.calls} service-LLM calls"
        f"{cached}, {spend.prompt_tokens + spend.completion_tokens} tokens"
    )


def watch_view(
    state: MigrationState,
    progress: Sequence[StageProgress],
    now: datetime,
    *,
    note: str = "",
) -> RenderableType:
    """Everything `llamaduo watch` shows, from the state, the latest progress per stage and the time."""
    current = current_stage(progress)
    parts: list[RenderableType] = [_header(state, current, now)]
    if current is not None and not state.terminal:
        parts.append(progress_line(current, now))
    elif not state.terminal:
        parts.append(Text("no progress heard yet", style="dim"))
    if state.iterations:
        parts.append(iterations_table(state))
    parts.append(_totals(state))
    if state.failure_reason:
        detail = f": {state.failure_detail}" if state.failure_detail else ""
        parts.append(Text(f"{state.status}: {state.failure_reason}{detail}", style="red"))
    if note:
        parts.append(Text(note, style="dim"))
    return Group(*parts)


def report_view(report: StatusReport, now: datetime, note: str = "") -> RenderableType:
    """`watch_view` of a status report (its note says when it came from KV)."""
    return watch_view(report.state, report.progress, now, note="; ".join(n for n in (report.note, note) if n))


@dataclass(frozen=True)
class WatchOutcome:
    """How watching ended."""

    state: MigrationState
    ended: bool
    """False when it stopped waiting for a resume the coordinator has not acted on."""


@dataclass
class _Watch:
    """The watch loop's mutable state."""

    client: Client
    migration_id: str
    report: StatusReport
    tracker: ProgressTracker
    resumed_after: int | None
    started: datetime
    resume_wait_s: float
    clock: Callable[[], datetime]
    problem: str = ""

    def awaiting_resume(self) -> bool:
        """A resume was asked for and the state does not show it yet."""
        state = self.report.state
        return self.resumed_after is not None and state.terminal and state.spec.resumed <= self.resumed_after

    def finished(self) -> bool:
        """The migration ended (and, after a resume, ended again), or the resume never came."""
        if not self.report.state.terminal:
            return False
        if self.awaiting_resume():
            return (self.clock() - self.started).total_seconds() >= self.resume_wait_s
        return True

    async def refresh(self) -> None:
        """Ask for the status again; on failure keep the last one and say why."""
        try:
            report = await self.client.status_report(self.migration_id)
        except Exception as exc:  # the bus hiccuped: keep showing what we have
            self.problem = f"status refresh failed: {exc!r}"
            log.debug("status refresh failed", extra={"migration_id": self.migration_id, "error": repr(exc)})
            return
        if report is None:
            self.problem = f"migration {self.migration_id} is no longer known"
            return
        self.problem = ""
        self.report = report
        self.tracker.merge(self.migration_id, report.progress, self.clock())

    def view(self) -> RenderableType:
        """The current frame."""
        now = self.clock()
        notes = [self.report.note, self.problem]
        if self.awaiting_resume():
            notes.append("resume requested; waiting for the coordinator to pick it up")
        state = self.report.state
        return watch_view(state, self.tracker.snapshot(self.migration_id), now, note="; ".join(n for n in notes if n))


async def watch(
    client: Client,
    migration_id: str,
    console: Console,
    *,
    refresh_s: float = 5.0,
    tick_s: float = 0.5,
    resumed_after: int | None = None,
    resume_wait_s: float = 120.0,
    clock: Callable[[], datetime] = utcnow,
) -> WatchOutcome | None:
    """Show the migration live until it ends; None when it is unknown.

    `resumed_after`: the migration's resume count before a resume was requested — a terminal state that does not
    show a later resume is the old run, so the view waits (up to `resume_wait_s`) instead of ending at once.
    """
    report = await client.status_report(migration_id)
    if report is None:
        return None
    started = clock()
    tracker = ProgressTracker(max_migrations=1)
    tracker.merge(migration_id, report.progress, started)
    state = _Watch(client, migration_id, report, tracker, resumed_after, started, resume_wait_s, clock)
    if state.finished():
        console.print(state.view())
        return WatchOutcome(state.report.state, ended=True)

    events: asyncio.Queue[Event] = asyncio.Queue()

    async def pump() -> None:
        async for event in client.follow(migration_id, started, stop_at_terminal=False):
            events.put_nowait(event)

    follower = asyncio.create_task(pump(), name=f"watch-{migration_id}")
    last_refresh = asyncio.get_running_loop().time()
    try:
        with Live(state.view(), console=console, auto_refresh=False, transient=False) as live:
            while not state.finished():
                refresh = False
                try:
                    event = await asyncio.wait_for(events.get(), timeout=tick_s)
                except TimeoutError:
                    event = None
                while event is not None:
                    if isinstance(event, Progress):
                        tracker.observe(event, clock())
                    else:
                        refresh = True  # state-changing event: the KV has it already (state first, then event)
                    event = events.get_nowait() if not events.empty() else None
                if follower.done() and not state.problem:
                    exc = follower.exception() if not follower.cancelled() else None
                    state.problem = f"event feed stopped ({exc!r}); refreshing every {refresh_s:g}s"
                loop_now = asyncio.get_running_loop().time()
                if refresh or loop_now - last_refresh >= refresh_s:
                    last_refresh = loop_now
                    await state.refresh()
                live.update(state.view(), refresh=True)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
    return WatchOutcome(state.report.state, ended=not state.awaiting_resume())
