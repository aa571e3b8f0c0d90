"""How migration events and states are shown to a person."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llamaduo.client import MigrationSummary
from llamaduo.contract import (
    DatasetReady,
    EvaluationCompleted,
    Event,
    MetricSummary,
    MigrationFailed,
    MigrationGraduated,
    MigrationRequested,
    MigrationResume,
    ModelTrained,
    NeedMoreData,
    Progress,
    ResponsesReady,
    TaskFailed,
)
from llamaduo.contract.spec import Metric
from llamaduo.state import MigrationState


def _scores(scores: Mapping[Metric, MetricSummary]) -> str:
    return "  ".join(f"{metric} {summary.mean:.1f}" for metric, summary in scores.items())


def describe(event: Event) -> str | None:
    """One line about an event, or None for events not worth a line."""
    it = getattr(event, "iteration", None)
    tag = f"[iter {it}] " if it is not None else ""
    match event:
        case MigrationRequested():
            return f"requested: task {event.spec.task.name!r}, base model {event.spec.base_model.id}"
        case DatasetReady():
            removed = f", removed {event.removed}" if event.removed else ""
            return f"{tag}dataset ready: {event.train_rows} training rows ({event.synthetic_rows} synthetic){removed}"
        case Progress():
            total = f"/{event.total}" if event.total else ""
            return f"{tag}{event.service}: {event.stage} {event.done}{total} {event.message}".rstrip()
        case ModelTrained():
            loss = f", loss {event.train_loss:.3f}" if event.train_loss is not None else ""
            return f"{tag}model trained: {event.steps} steps in {event.train_seconds:.0f}s{loss}"
        case ResponsesReady():
            return f"{tag}responses ready: {event.prompts} prompts x {event.responses_per_prompt}"
        case EvaluationCompleted():
            failed = f" ({event.failed_judgments} judgments failed)" if event.failed_judgments else ""
            return f"{tag}evaluated: {_scores(event.scores)}{failed}, judge spend ${event.spend.usd:.4f}"
        case NeedMoreData():
            return f"{tag}below threshold: synthesizing {event.new_rows} more rows"
        case MigrationGraduated():
            return f"{tag}GRADUATED: {_scores(event.scores)}"
        case MigrationFailed():
            return f"{tag}FAILED: {event.reason} {event.detail}".rstrip()
        case MigrationResume():
            budgets = f" with budgets {event.budgets.model_dump(exclude_none=True)}" if event.budgets else ""
            return f"resume requested{budgets}: {event.reason}"
        case TaskFailed():
            return f"{tag}{event.service} gave up on {event.stage}: {event.reason} {event.detail}".rstrip()
    return None


def state_table(states: list[MigrationState]) -> Table:
    """A table of migrations."""
    table = Table("migration", "status", "iteration", "best scores", "spend", "updated")
    for state in sorted(states, key=lambda s: s.created_at):
        best = state.best()
        table.add_row(
            state.migration_id,
            state.status,
            str(state.iteration),
            _scores(best.scores) if best and best.scores else "-",
            f"${state.spend.usd:.4f}",
            state.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 3m 05s, 2h 10m, 3d 4h."""
    total = max(round(seconds), 0)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _local_time(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def summary_table(summaries: list[MigrationSummary]) -> Table:
    """A table of migrations from their summaries (status endpoint or KV)."""
    table = Table()
    table.add_column("migration", no_wrap=True)
    table.add_column("status")
    table.add_column("iter", justify="right")
    table.add_column("best scores")
    table.add_column("spend", justify="right", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    for item in sorted(summaries, key=lambda s: s.created_at):
        best = "  ".join(f"{metric} {mean:.1f}" for metric, mean in (item.best_scores or {}).items()) or "-"
        status = item.status if not item.failure_reason else f"{item.status} ({item.failure_reason})"
        table.add_row(
            escape(item.migration_id),
            escape(status),
            str(item.iteration),
            best,
            f"${item.spend_usd:.4f}",
            _local_time(item.updated_at),
        )
    return table


def result_lines(state: MigrationState, with_spend: bool = True) -> list[str]:
    """Where a migration's best adapter is, how to serve it, and what it cost (plain text, no markup)."""
    lines: list[str] = []
    best = state.best()
    if best and best.adapter:
        label = "adapter" if state.status == "graduated" else "best adapter so far"
        lines.append(f"  {label}: {best.adapter.uri}")
        if best.judgments:
            lines.append(f"  judgments: {best.judgments.uri}")
        lines.append(
            f"  serve it: llamaduo serve --model {state.spec.base_model.id} "
            f"--adapter {state.migration_id}={best.adapter.uri}"
        )
        if state.status == "graduated":
            lines.append(
                f'  then in your app: OpenAI(base_url="http://127.0.0.1:8000/v1") with model="{state.migration_id}"'
            )
    if with_spend:
        lines.append(
            f"  service-LLM spend: ${state.spend.usd:.4f} over {state.spend.calls} calls "
            f"({state.spend.prompt_tokens + state.spend.completion_tokens} tokens)"
        )
    if state.terminal and state.iterations:
        lines.append(f"  report: llamaduo report {state.migration_id}  (HTML page, figures, break-even)")
    if state.status in ("failed", "cancelled") and state.train is not None:
        lines.append(f"  continue it: llamaduo resume {state.migration_id} [--max-iterations N] [--max-cost-usd X]")
    return lines


def print_outcome(console: Console, state: MigrationState) -> None:
    """What a finished migration produced and where it is."""
    console.print(f"[bold]migration {escape(state.migration_id)}: {state.status}[/bold]")
    lines: list[str] = []
    if state.failure_reason:
        lines.append(f"  reason: {state.failure_reason} {state.failure_detail or ''}")
    for record in state.iterations:
        scores = _scores(record.scores) if record.scores else "not evaluated"
        lines.append(
            f"  iteration {record.iteration}: {record.train_rows} rows ({record.synthetic_rows} synthetic), "
            f"{scores}, decision {record.decision or '-'}"
        )
    lines.extend(result_lines(state))
    for line in lines:
        console.print(line, markup=False)
