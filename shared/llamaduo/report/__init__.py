"""Migration reports (one HTML page with charts) and per-iteration lineage.

Lineage and report data need only the core library; the charts need matplotlib (`pip install 'llamaduo[report]'`),
imported only when a report is written, so the coordinator can write lineage without it.
"""

from __future__ import annotations

from pathlib import Path

from llamaduo.report.breakeven import BreakEven, estimate_break_even
from llamaduo.report.data import ReportData, build_report_data
from llamaduo.report.lineage import Lineage, build_lineage, write_lineage
from llamaduo.state import MigrationState
from llamaduo.store import ArtifactStore

REPORT_FILE = "report.html"


def write_report_files(
    state: MigrationState, store: ArtifactStore, out_dir: Path, gpu_usd_per_hour: float = 2.0
) -> list[Path]:
    """Write `report.html` and its charts (PNGs, also embedded in the page) into `out_dir`; return their paths."""
    from llamaduo.report.figures import render_figures
    from llamaduo.report.html import render_html

    report = build_report_data(state, store, gpu_usd_per_hour=gpu_usd_per_hour)
    figures = render_figures(report)
    lineages = [build_lineage(store, state, record.iteration) for record in state.iterations]
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / REPORT_FILE
    page.write_text(render_html(report, figures, lineages), encoding="utf-8")
    charts: list[Path] = []
    for figure in figures:
        path = out_dir / figure.name
        path.write_bytes(figure.png)
        charts.append(path)
    return [page, *charts]


def write_report(state: MigrationState, store: ArtifactStore, out_dir: Path, gpu_usd_per_hour: float = 2.0) -> Path:
    """Write the report of a migration into `out_dir` and return the path of `report.html`."""
    return write_report_files(state, store, out_dir, gpu_usd_per_hour)[0]


__all__ = [
    "REPORT_FILE",
    "BreakEven",
    "Lineage",
    "ReportData",
    "build_lineage",
    "build_report_data",
    "estimate_break_even",
    "write_lineage",
    "write_report",
    "write_report_files",
]
