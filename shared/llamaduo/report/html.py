"""The report as one self-contained HTML page: inline CSS, PNGs as data URIs, every piece of text escaped."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape

from llamaduo.contract import ArtifactRef
from llamaduo.report.breakeven import BreakEven
from llamaduo.report.data import Example, IterationRow, ReportData, Serving
from llamaduo.report.figures import RenderedFigure
from llamaduo.report.lineage import Lineage

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;
color:#1f2328;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:.6rem;border-radius:6px;white-space:pre-wrap;word-break:break-word;margin:.2rem 0}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.88rem}
.status{display:inline-block;padding:.1rem .6rem;border-radius:1rem;font-weight:600;color:#fff;background:#57606a}
.status.graduated{background:#1a7f37}.status.failed{background:#cf222e}.status.running{background:#0969da}
.muted{color:#57606a}.figures img{max-width:100%;border:1px solid #d0d7de;border-radius:6px;margin:.4rem 0}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1rem}
.columns{display:grid;grid-template-columns:1fr 1fr;gap:1.2rem}
.example{border:1px solid #d0d7de;border-radius:6px;padding:.6rem .8rem;margin-bottom:1rem}
.example h4{margin:.1rem 0 .4rem}.label{font-weight:600;font-size:.85rem;margin-top:.4rem}
details{border:1px solid #d0d7de;border-radius:6px;padding:.4rem .8rem;margin:.5rem 0}
summary{cursor:pointer;font-weight:600}
"""


def _e(value: object) -> str:
    """Escaped text (quotes too, so it is safe in attributes)."""
    return escape(str(value), quote=True)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}"


def _tokens(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table from already-escaped cells (`<td>` unless a cell starts with `<td`)."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ref(ref: ArtifactRef | None) -> str:
    if ref is None:
        return '<span class="muted">absent</span>'
    return f"<code>{_e(ref.uri)}</code><br><span class='muted'>sha256 {_e(ref.sha256)} · {ref.size:,} bytes</span>"


def _header(report: ReportData) -> str:
    reason = ""
    if report.failure_reason:
        detail = f" — {_e(report.failure_detail)}" if report.failure_detail else ""
        reason = f"<p><strong>Reason:</strong> <code>{_e(report.failure_reason)}</code>{detail}</p>"
    return (
        f"<h1>Migration {_e(report.migration_id)}</h1>"
        f'<p><span class="status {_e(report.status)}">{_e(report.status)}</span> '
        f"task <strong>{_e(report.task_name)}</strong> · base model <code>{_e(report.base_model)}</code> · "
        f"created {_e(report.created_at.isoformat(timespec='seconds'))} · "
        f"updated {_e(report.updated_at.isoformat(timespec='seconds'))}</p>{reason}"
        f"<p>Service-LLM spend: {_usd(report.total_spend.usd)} over {report.total_spend.calls:,} calls "
        f"({report.total_spend.prompt_tokens + report.total_spend.completion_tokens:,} tokens). "
        f"Graduation: every metric's {'mean' if report.gate == 'mean' else 'CI lower bound'} reaches its threshold "
        f"({_e(', '.join(f'{metric} {value:g}' for metric, value in report.thresholds.items()))}).</p>"
    )


def _iteration_cells(row: IterationRow, report: ReportData) -> list[str]:
    cells = [
        str(row.iteration),
        f'<td class="num">{row.train_rows:,}</td>',
        f'<td class="num">{row.coverage_rows:,}</td>',
        f'<td class="num">{row.synthetic_rows:,}</td>',
        f'<td class="num">{_usd(row.usd)}</td>',
    ]
    if not row.evaluated:
        cells.append(f'<td colspan="{len(report.metrics) + 1}" class="muted">not evaluated</td>')
    else:
        for metric in report.metrics:
            point = row.scores.get(metric)
            if point is None:
                cells.append('<td class="muted">not scored</td>')
                continue
            ci = f" [{_num(point.ci_low)}, {_num(point.ci_high)}]" if point.ci_low is not None else ""
            threshold = f" / {point.threshold:g}" if point.threshold is not None else ""
            cells.append(f'<td class="num">{_num(point.mean)}{ci}{threshold}</td>')
        cells.append(f'<td class="num">{row.failed_judgments}</td>')
    cells.append(_e(row.decision or "-"))
    return cells


def _iterations(report: ReportData) -> str:
    if not report.iterations:
        return "<h2>Iterations</h2><p class='muted'>No iteration started.</p>"
    header = ["iteration", "train rows", "coverage", "synthetic", "dollars"]
    header += [f"{_e(metric)} mean [CI] / threshold" for metric in report.metrics]
    header += ["failed judgments", "decision"]
    table = _table(header, (_iteration_cells(row, report) for row in report.iterations))
    return f"<h2>Iterations</h2>{table}"


def _figures(figures: Sequence[RenderedFigure]) -> str:
    if not figures:
        return ""
    images = "".join(
        f'<figure><img alt="{_e(figure.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(figure.png).decode("ascii")}"><figcaption class="muted">{_e(figure.title)}'
        f"</figcaption></figure>"
        for figure in figures
    )
    return f'<h2>Charts</h2><div class="figures">{images}</div>'


def _example(example: Example) -> str:
    scores = ", ".join(f"{metric} {value:.1f}" for metric, value in example.scores.items())
    category = f" · {_e(example.category)}" if example.category else ""
    reference = (
        f"<pre>{_e(example.reference)}</pre>"
        if example.reference is not None
        else "<p class='muted'>the test split could not be read</p>"
    )
    judgments = "".join(
        f"<li><code>{_e(note.judge_model)}</code> #{note.repeat}: "
        + (
            f"<span class='muted'>failed: {_e(note.error)}</span>"
            if note.error
            else f"similarity {_num(note.similarity, 0)}, precision {_num(note.precision, 0)} — {_e(note.reason)}"
        )
        + "</li>"
        for note in example.judgments
    )
    return (
        f'<div class="example"><h4>score {example.score:.1f} <span class="muted">({_e(scores)}) · test row '
        f"{example.index}, response {example.response_index}{category}</span></h4>"
        f'<div class="label">Prompt</div><pre>{_e(example.prompt)}</pre>'
        f'<div class="label">Model response</div><pre>{_e(example.response)}</pre>'
        f'<div class="label">Human reference</div>{reference}'
        f'<div class="label">Judge</div><ul>{judgments}</ul></div>'
    )


def _examples(report: ReportData) -> str:
    if report.best_iteration is None:
        return "<h2>Examples</h2><p class='muted'>Not evaluated: no judged responses yet.</p>"
    if not report.best_examples:
        return (
            f"<h2>Examples (iteration {report.best_iteration})</h2>"
            "<p class='muted'>The judged responses could not be read (see the notes).</p>"
        )
    best = "".join(map(_example, report.best_examples))
    worst = "".join(map(_example, report.worst_examples)) or "<p class='muted'>No other judged response.</p>"
    return (
        f"<h2>Examples (iteration {report.best_iteration})</h2>"
        "<p class='muted'>Responses ranked by their mean score over the metrics (each the panel's combined mean "
        "of its judges' repeats).</p>"
        f'<div class="columns"><div><h3>Best</h3>{best}</div><div><h3>Worst</h3>{worst}</div></div>'
    )


def _serving(serving: Serving | None, status: str) -> str:
    if serving is None:
        return "<h2>Adapter</h2><p class='muted'>Not evaluated: no adapter to serve yet.</p>"
    label = (
        "The graduated adapter"
        if serving.graduated
        else f"The best adapter so far (the migration is {_e(status)}; it did not graduate)"
    )
    return (
        f"<h2>Adapter</h2><p>{label}: iteration {serving.iteration} on <code>{_e(serving.base_model)}</code>.</p>"
        f"<p>{_ref(serving.adapter)}</p>"
        f"<p>Serve it behind an OpenAI-compatible API:</p><pre><code>{_e(serving.serve_command)}</code></pre>"
        f"<p>Then change one line in your app: <code>{_e(serving.client_change)}</code> and ask for "
        f"<code>{_e(serving.client_model)}</code>.</p>"
    )


def _break_even(value: BreakEven) -> str:
    rows = [
        ["service LLM (ledger)", f"{_usd(value.service_usd)} over {value.service_tokens:,} tokens",
         _usd(value.service_usd_per_million) if value.service_usd_per_million is not None else "not measurable"],
        ["local model on a GPU", f"{_num(value.local_tokens_per_second)} completion tokens/s at "
         f"${value.gpu_usd_per_hour:,.2f}/hour",
         _usd(value.local_usd_per_million) if value.local_usd_per_million is not None else "not measurable"],
    ]  # fmt: skip
    numbers = _table(["", "measured", "$ per 1M tokens"], rows)
    volume = ""
    if value.break_even_tokens_per_month is not None:
        capacity = _tokens(value.local_capacity_tokens_per_month)
        volume = (
            f"<p>Break-even volume: <strong>{_tokens(value.break_even_tokens_per_month)} tokens a month</strong> "
            f"(a GPU month costs ${value.gpu_usd_per_month:,.2f}; one GPU generates up to {capacity} tokens a "
            "month at the measured throughput).</p>"
        )
    assumptions = "".join(f"<li>{_e(line)}</li>" for line in value.assumptions)
    return (
        f"<h2>Break-even</h2>{numbers}{volume}<p><strong>{_e(value.verdict)}</strong></p>"
        f"<p class='muted'>Assumptions (change the GPU price with <code>--gpu-usd-per-hour</code>):</p>"
        f"<ul class='muted'>{assumptions}</ul>"
    )


def _lineage(lineage: Lineage) -> str:
    rows: list[list[str]] = [["spec", f"sha256 {_e(lineage.spec.sha256)}"]]
    rows.append(["test split", _ref(lineage.test)])
    rows.append(["dataset manifest", _ref(lineage.dataset.manifest)])
    if lineage.dataset.shards is not None:
        shards = _table(
            ["origin", "round", "rows", "sha256", "uri"],
            (
                [_e(s.origin), _e(s.round_index if s.round_index is not None else "-"), f"{s.rows:,}",
                 f"<code>{_e(s.sha256)}</code>", f"<code>{_e(s.uri)}</code>"]
                for s in lineage.dataset.shards
            ),
        )  # fmt: skip
        rows.append(["shards", shards])
    if lineage.synthesis is not None:
        synthesis = lineage.synthesis
        template = synthesis.prompt_template_sha256 or "(default)"
        rows.append(
            [
                "synthesis",
                f"model <code>{_e(synthesis.generator_model or '(synthesizer default)')}</code>, prompt template "
                f"{_e(synthesis.prompt_template_source)} <code>{_e(template)}</code>, kept {_e(synthesis.kept)} of "
                f"{_e(synthesis.asked)} asked, {_usd(synthesis.spend.usd if synthesis.spend else None)}",
            ]
        )
    if lineage.training is not None:
        training = lineage.training
        rows.append(
            [
                "training",
                f"base <code>{_e(training.base_model)}</code>, {_e(training.precision or '?')}, "
                f"{_e(training.steps if training.steps is not None else '?')} steps, "
                f"loss {_num(training.train_loss, 3)}, {_num(training.tokens_per_second)} tokens/s "
                f"({_e(training.config_source)})",
            ]
        )
        rows.append(["adapter", _ref(training.adapter)])
    if lineage.inference is not None:
        inference = lineage.inference
        rows.append(
            [
                "inference",
                f"{_e(inference.backend or '?')} on {_e(inference.device or '?')}, "
                f"{_num(inference.completion_tokens_per_second)} completion tokens/s<br>{_ref(inference.responses)}",
            ]
        )
    if lineage.evaluation is not None:
        evaluation = lineage.evaluation
        scores = ", ".join(f"{metric} {summary.mean:.1f}" for metric, summary in evaluation.scores.items())
        rows.append(
            [
                "evaluation",
                f"judges {_e(', '.join(evaluation.judges))}; {_e(scores or 'no scores')}; "
                f"{evaluation.failed_judgments} failed<br>{_ref(evaluation.judgments)}",
            ]
        )
    rows.append(["decision", _e(lineage.decision or "-")])
    if lineage.absent:
        rows.append(["absent", _e(", ".join(lineage.absent))])
    if lineage.problems:
        rows.append(["problems", "<br>".join(_e(problem) for problem in lineage.problems)])
    summary = f"Iteration {lineage.iteration}: {_e(lineage.decision or 'no decision yet')}"
    return (
        f"<details><summary>{summary}</summary>{_table(['', ''], rows)}"
        f"<details><summary>lineage.json</summary><pre><code>{_e(lineage.model_dump_json(indent=1))}</code></pre>"
        "</details></details>"
    )


def render_html(report: ReportData, figures: Sequence[RenderedFigure], lineages: Sequence[Lineage]) -> str:
    """The whole report page."""
    notes = ""
    if report.notes:
        notes = "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(note)}</li>" for note in report.notes) + "</ul>"
    lineage = "".join(map(_lineage, lineages)) or "<p class='muted'>No iteration started.</p>"
    body = "".join(
        [
            _header(report),
            _iterations(report),
            _figures(figures),
            _examples(report),
            _serving(report.serving, report.status),
            _break_even(report.break_even),
            f"<h2>Lineage</h2>{lineage}",
            notes,
        ]
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>LlamaDuo report: {_e(report.migration_id)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
