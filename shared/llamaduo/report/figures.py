"""The report's charts as PNGs (matplotlib, Agg canvas, no pyplot state), each with the data it plots.

Every figure is built from a small series object that is kept beside the PNG, so what a chart shows can be checked
from its data rather than its pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from llamaduo.contract.spec import Metric
from llamaduo.report.data import ReportData

_DPI = 110
_SIZE = (6.4, 3.6)
_COVERAGE_COLOR = "#4c72b0"
_SYNTHETIC_COLOR = "#dd8452"
_THRESHOLD_COLOR = "#c44e52"


@dataclass(frozen=True)
class MetricSeries:
    """One metric over the evaluated iterations: means with their CIs, and the graduation threshold."""

    metric: Metric
    iterations: list[int]
    means: list[float]
    ci_low: list[float | None]
    ci_high: list[float | None]
    threshold: float | None

    @property
    def errors(self) -> tuple[list[float], list[float]]:
        """Distances from each mean down to its CI's low end and up to its high end (0 where there is no CI)."""
        below = [mean - low if low is not None else 0.0 for mean, low in zip(self.means, self.ci_low, strict=True)]
        above = [high - mean if high is not None else 0.0 for mean, high in zip(self.means, self.ci_high, strict=True)]
        return [max(value, 0.0) for value in below], [max(value, 0.0) for value in above]


@dataclass(frozen=True)
class DatasetSeries:
    """Training rows per iteration, coverage and synthetic (stacked)."""

    iterations: list[int]
    coverage: list[int]
    synthetic: list[int]


@dataclass(frozen=True)
class SpendSeries:
    """Service-LLM dollars per iteration and their running total."""

    iterations: list[int]
    usd: list[float]
    cumulative: list[float]


Series = MetricSeries | DatasetSeries | SpendSeries


@dataclass(frozen=True)
class RenderedFigure:
    """One chart: its file name, title, PNG bytes and the series it plots."""

    name: str
    title: str
    png: bytes
    data: Series


def metric_series(report: ReportData) -> list[MetricSeries]:
    """One series per metric with at least one evaluated iteration."""
    series: list[MetricSeries] = []
    for metric in report.metrics:
        rows = [row for row in report.iterations if metric in row.scores]
        if not rows:
            continue
        points = [row.scores[metric] for row in rows]
        series.append(
            MetricSeries(
                metric=metric,
                iterations=[row.iteration for row in rows],
                means=[point.mean for point in points],
                ci_low=[point.ci_low for point in points],
                ci_high=[point.ci_high for point in points],
                threshold=report.thresholds.get(metric),
            )
        )
    return series


def dataset_series(report: ReportData) -> DatasetSeries:
    """Coverage and synthetic training rows of every iteration."""
    return DatasetSeries(
        iterations=[row.iteration for row in report.iterations],
        coverage=[row.coverage_rows for row in report.iterations],
        synthetic=[row.synthetic_rows for row in report.iterations],
    )


def spend_series(report: ReportData) -> SpendSeries:
    """Dollars of every iteration and their running total."""
    return SpendSeries(
        iterations=[row.iteration for row in report.iterations],
        usd=[row.usd for row in report.iterations],
        cumulative=[row.cumulative_usd for row in report.iterations],
    )


def _figure() -> Figure:
    figure = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: rendering never touches pyplot or an interactive backend
    return figure


def plot_metric(series: MetricSeries) -> Figure:
    """Mean per iteration with CI error bars, and the threshold as a horizontal line."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.errorbar(
        series.iterations, series.means, yerr=series.errors, fmt="o-", capsize=4, label=f"mean {series.metric}"
    )
    if series.threshold is not None:
        axes.axhline(series.threshold, color=_THRESHOLD_COLOR, linestyle="--", label=f"threshold {series.threshold:g}")
    axes.set(title=f"{series.metric} per iteration (mean, CI)", xlabel="iteration", ylabel=series.metric)
    axes.set_ylim(0, 105)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="lower right")
    return figure


def plot_dataset(series: DatasetSeries) -> Figure:
    """Training rows per iteration: coverage with synthetic stacked on top."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.bar(series.iterations, series.coverage, color=_COVERAGE_COLOR, label="coverage (train split)")
    axes.bar(series.iterations, series.synthetic, bottom=series.coverage, color=_SYNTHETIC_COLOR, label="synthetic")
    axes.set(title="training rows per iteration", xlabel="iteration", ylabel="rows")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="upper left")
    return figure


def plot_spend(series: SpendSeries) -> Figure:
    """Service-LLM dollars per iteration (bars) and cumulative (line)."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.bar(series.iterations, series.usd, color=_COVERAGE_COLOR, label="per iteration")
    axes.plot(series.iterations, series.cumulative, "o-", color=_THRESHOLD_COLOR, label="cumulative")
    axes.set(title="service-LLM dollars per iteration", xlabel="iteration", ylabel="USD")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="upper left")
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes (no timestamp or software metadata)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def render_figures(report: ReportData) -> list[RenderedFigure]:
    """Every chart of the report: one per evaluated metric, then dataset size and dollars (none without iterations)."""
    figures = [
        RenderedFigure(
            name=f"metric-{series.metric}.png",
            title=f"{series.metric} per iteration",
            png=png_bytes(plot_metric(series)),
            data=series,
        )
        for series in metric_series(report)
    ]
    if report.iterations:
        dataset = dataset_series(report)
        spend = spend_series(report)
        figures.append(
            RenderedFigure(name="dataset.png", title="dataset size", png=png_bytes(plot_dataset(dataset)), data=dataset)
        )
        figures.append(RenderedFigure(name="spend.png", title="dollars", png=png_bytes(plot_spend(spend)), data=spend))
    return figures
