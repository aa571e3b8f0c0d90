"""`llamaduo report`: the numbers, charts, examples, break-even and HTML of a finished (or unfinished) migration."""

from __future__ import annotations

import base64
import importlib
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.patches import Rectangle
from typer.testing import CliRunner

from llamaduo.cli import app
from llamaduo.contract import Spend
from llamaduo.contract.spec import Metric
from llamaduo.data import MANIFEST_MEDIA_TYPE, DatasetManifest, Shard
from llamaduo.data.results import Judgment
from llamaduo.report import build_report_data, estimate_break_even, write_report
from llamaduo.report.data import rank_examples, response_scores
from llamaduo.report.figures import (
    DatasetSeries,
    MetricSeries,
    SpendSeries,
    plot_dataset,
    plot_metric,
    render_figures,
)
from llamaduo.state import IterationRecord, MigrationState
from llamaduo.store import LocalStore, artifact_key
from tests.support.migration_artifacts import (
    MIGRATION_ID,
    REFERENCES,
    SCRIPT_PROMPT,
    TEST_PROMPTS,
    Built,
    build_migration,
    make_spec,
)

runner = CliRunner()


@pytest.fixture
def built(store: LocalStore) -> Built:
    return build_migration(store)


def _bars(container: object) -> list[tuple[float, float, float]]:
    assert isinstance(container, BarContainer)
    patches = [patch for patch in container.patches if isinstance(patch, Rectangle)]
    return [(patch.get_x() + patch.get_width() / 2, patch.get_y(), patch.get_height()) for patch in patches]


# -- report data ---------------------------------------------------------------------------------------------------


def test_the_iteration_table_has_rows_dollars_and_scores_with_thresholds(store: LocalStore, built: Built) -> None:
    report = build_report_data(built.state, store)
    rows = [
        (row.iteration, row.train_rows, row.coverage_rows, row.synthetic_rows, row.decision)
        for row in report.iterations
    ]
    assert rows == [(0, 6, 6, 0, "need_more_data"), (1, 16, 6, 10, "need_more_data"), (2, 36, 6, 30, "graduated")]
    assert [row.usd for row in report.iterations] == pytest.approx([0.05, 0.17, 0.29])
    assert [row.cumulative_usd for row in report.iterations] == pytest.approx([0.05, 0.22, 0.51])
    last = report.iterations[2].scores
    assert (last["similarity"].mean, last["similarity"].ci_low, last["similarity"].ci_high) == (86.0, 80.5, 91.2)
    assert (last["similarity"].threshold, last["precision"].threshold) == (85.0, 80.0)
    assert report.metrics == ["similarity", "precision"] and report.best_iteration == 2
    assert report.status == "graduated" and report.total_spend == built.state.spend


def test_figures_plot_each_metric_with_its_ci_and_threshold_the_stacked_dataset_and_the_dollars(
    store: LocalStore, built: Built
) -> None:
    figures = render_figures(build_report_data(built.state, store))
    assert [figure.name for figure in figures] == [
        "metric-similarity.png",
        "metric-precision.png",
        "dataset.png",
        "spend.png",
    ]
    assert all(figure.png.startswith(b"\x89PNG\r\n\x1a\n") for figure in figures)
    similarity, precision, dataset, spend = (figure.data for figure in figures)
    assert similarity == MetricSeries(
        metric="similarity",
        iterations=[0, 1, 2],
        means=[55.0, 72.0, 86.0],
        ci_low=[48.0, 66.0, 80.5],
        ci_high=[62.0, 78.0, 91.2],
        threshold=85.0,
    )
    assert isinstance(precision, MetricSeries)
    assert (precision.means, precision.threshold) == ([50.0, 68.0, 82.0], 80.0)
    below, above = similarity.errors
    assert below == pytest.approx([7.0, 6.0, 5.5]) and above == pytest.approx([7.0, 6.0, 5.2])
    assert dataset == DatasetSeries(iterations=[0, 1, 2], coverage=[6, 6, 6], synthetic=[0, 10, 30])
    assert isinstance(spend, SpendSeries) and spend.iterations == [0, 1, 2]
    assert spend.usd == pytest.approx([0.05, 0.17, 0.29]) and spend.cumulative == pytest.approx([0.05, 0.22, 0.51])


def test_the_charts_draw_the_series_they_expose() -> None:
    series = MetricSeries("precision", [0, 2], [60.0, 82.0], [55.0, None], [66.0, None], threshold=80.0)
    axes = plot_metric(series).axes[0]
    mean_line, threshold_line = axes.get_lines()[0], axes.get_lines()[-1]
    assert np.asarray(mean_line.get_xdata()).tolist() == [0, 2] and np.asarray(mean_line.get_ydata()).tolist() == [
        60.0,
        82.0,
    ]
    assert np.asarray(threshold_line.get_ydata()).tolist() == [80.0, 80.0]
    assert series.errors == ([5.0, 0.0], [6.0, 0.0])  # no CI: no error bar, not a crash
    stacked = plot_dataset(DatasetSeries([0, 1], coverage=[6, 6], synthetic=[0, 10])).axes[0]
    coverage, synthetic = stacked.containers
    assert _bars(coverage) == [(0, 0, 6), (1, 0, 6)]
    assert _bars(synthetic) == [(0, 6, 0), (1, 6, 10)]  # on top of the coverage rows


# -- examples ------------------------------------------------------------------------------------------------------


def test_best_and_worst_examples_are_the_top_and_bottom_responses_of_the_best_iteration(
    store: LocalStore, built: Built
) -> None:
    report = build_report_data(built.state, store)
    best = [(e.index, e.response_index, e.score) for e in report.best_examples]
    worst = [(e.index, e.response_index, e.score) for e in report.worst_examples]
    assert best == [(1, 1, 97.5), (0, 0, 92.5), (3, 1, 90.0)]
    assert worst == [(2, 0, 17.5), (3, 0, 36.0), (0, 1, 56.0)]
    bottom = report.worst_examples[0]
    assert bottom.prompt == SCRIPT_PROMPT == TEST_PROMPTS[2]
    assert bottom.reference == REFERENCES[2] and bottom.category == "cat-0"
    assert bottom.response == "answer 2.0 <em>model</em>"
    assert bottom.scores == {"similarity": 25.0, "precision": 10.0}
    assert [(note.repeat, note.similarity, note.precision) for note in bottom.judgments] == [(0, 20, 10), (1, 30, 10)]
    assert bottom.judgments[0].reason == "row 2 response 0: <i>close</i> to the reference"
    # The failed judgment is shown with its error and counts toward no score.
    failed = [note for note in report.worst_examples[1].judgments if note.error]
    assert [note.error for note in failed] == ["invalid JSON from the judge"]


def _judgment(judge: str, repeat: int, similarity: float, precision: float, index: int = 0) -> Judgment:
    return Judgment(
        index=index,
        response_index=0,
        repeat=repeat,
        judge_model=judge,
        similarity=similarity,
        precision=precision,
    )


def test_a_response_score_averages_each_judges_repeats_then_combines_the_panel_like_the_spec() -> None:
    judgments = [
        _judgment("a", 0, 90, 80),
        _judgment("a", 1, 100, 80),
        _judgment("b", 0, 70, 60),
        Judgment(index=0, response_index=0, repeat=1, judge_model="b", similarity=1, precision=1, error="late"),
    ]
    assert response_scores(judgments, ["similarity", "precision"]) == {(0, 0): {"similarity": 82.5, "precision": 70.0}}
    strictest = response_scores(judgments, ["similarity", "precision"], "strictest")
    assert strictest == {(0, 0): {"similarity": 70.0, "precision": 60.0}}


def test_best_and_worst_never_show_the_same_response_and_ties_are_deterministic() -> None:
    scores: dict[tuple[int, int], dict[Metric, float]] = {(index, 0): {"similarity": 50.0} for index in range(4)}
    best, worst = rank_examples(scores)
    assert best == [(0, 0), (1, 0), (2, 0)] and worst == [(3, 0)]


# -- break-even ----------------------------------------------------------------------------------------------------


def test_break_even_compares_the_ledger_price_with_a_gpu_month_at_the_measured_throughput(
    store: LocalStore, built: Built
) -> None:
    value = build_report_data(built.state, store).break_even
    service = 0.51 / 91_800 * 1e6  # the ledger: $0.51 over 63,000 prompt + 28,800 completion tokens
    assert value.service_tokens == 91_800 and value.service_usd_per_million == pytest.approx(service)
    assert value.local_tokens_per_second == 250.0 and value.local_iteration == 2  # the best iteration's throughput
    assert value.local_usd_per_million == pytest.approx(2.0 / (250.0 * 3600) * 1e6)
    assert value.gpu_usd_per_month == pytest.approx(1460.0)
    assert value.local_capacity_tokens_per_month == pytest.approx(250.0 * 3600 * 730)
    assert value.break_even_tokens_per_month == pytest.approx(1460.0 / service * 1e6)
    assert value.within_capacity is True
    assert value.verdict.startswith("Above 262.80M tokens a month the local model is cheaper")
    assert any("730 hours" in line for line in value.assumptions)


def test_a_dear_gpu_never_breaks_even_and_missing_measurements_are_named() -> None:
    ledger = Spend(calls=3, prompt_tokens=600_000, completion_tokens=400_000, usd=5.0)  # $5 per 1M tokens
    dear = estimate_break_even(ledger, 250.0, 10.0)
    assert dear.local_usd_per_million == pytest.approx(10.0 / 0.9)
    assert dear.break_even_tokens_per_month == pytest.approx(7300.0 / 5.0 * 1e6)
    assert dear.within_capacity is False and dear.verdict.startswith("One GPU never breaks even")
    for free in (Spend(), Spend(calls=2, prompt_tokens=100, completion_tokens=50, usd=0.0)):
        unpriced = estimate_break_even(free, 250.0, 2.0)
        assert unpriced.service_usd_per_million is None and unpriced.break_even_tokens_per_month is None
        assert unpriced.verdict.startswith("Not measurable: the ledger")
    unmeasured = estimate_break_even(ledger, None, 2.0)
    assert unmeasured.local_usd_per_million is None and unmeasured.within_capacity is None
    assert unmeasured.service_usd_per_million == pytest.approx(5.0)
    assert "no inference throughput" in unmeasured.verdict
    with pytest.raises(ValueError, match="gpu_usd_per_hour"):
        estimate_break_even(ledger, 250.0, -1.0)


# -- the page ------------------------------------------------------------------------------------------------------


def test_the_page_escapes_user_text_embeds_the_charts_and_shows_how_to_serve(
    store: LocalStore, built: Built, tmp_path: Path
) -> None:
    page = write_report(built.state, store, tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "<em>model" not in text and "<i>close" not in text
    assert "Summarise: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; fix the parser" in text
    assert "Fix the parser&#x27;s &lt;b&gt;escaping&lt;/b&gt;" in text  # the human reference, escaped
    assert "answer 2.0 &lt;em&gt;model&lt;/em&gt;" in text
    assert "<title>LlamaDuo report: commit-msg-report</title>" in text and "commit &lt;messages&gt;" in text
    for name in ("metric-similarity.png", "metric-precision.png", "dataset.png", "spend.png"):
        png = (tmp_path / "out" / name).read_bytes()
        assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in text
    assert text.count("data:image/png;base64,") == 4
    adapter = built.state.iterations[2].adapter
    assert adapter is not None
    assert f"llamaduo serve --model bundled:smollm2-135m-instruct --adapter {MIGRATION_ID}={adapter.uri}" in text
    assert (
        "OpenAI(base_url=&quot;http://127.0.0.1:8000/v1&quot;)" in text and f"model=&quot;{MIGRATION_ID}&quot;" in text
    )
    assert "Above 262.80M tokens a month the local model is cheaper" in text
    assert text.count("<summary>Iteration ") == 3 and "Iteration 2: graduated" in text
    assert built.state.spec.model_dump()["evaluation"]["judge"]["model"] in text


def _unevaluated_state(store: LocalStore) -> MigrationState:
    migration_id = "fresh-migration"
    train = store.put_bytes(artifact_key(migration_id, None, "coverage", "train.jsonl"), b'{"messages": []}\n')
    manifest = DatasetManifest(
        migration_id=migration_id, iteration=0, shards=[Shard(ref=train, rows=5, origin="coverage")]
    )
    ref = store.put_bytes(
        artifact_key(migration_id, 0, "dataset", "manifest.json"),
        manifest.model_dump_json().encode(),
        MANIFEST_MEDIA_TYPE,
    )
    return MigrationState(
        migration_id=migration_id,
        spec=make_spec(),
        status="running",
        train=train,
        iterations=[IterationRecord(iteration=0, dataset=ref, train_rows=5, synthetic_rows=0)],
    )


def test_a_migration_with_no_evaluated_iteration_still_renders(store: LocalStore, tmp_path: Path) -> None:
    state = _unevaluated_state(store)
    report = build_report_data(state, store)
    assert report.best_iteration is None and report.serving is None
    assert report.best_examples == [] and report.worst_examples == []
    assert not report.iterations[0].evaluated
    assert report.break_even.verdict.startswith("Not measurable")
    assert [figure.name for figure in render_figures(report)] == ["dataset.png", "spend.png"]
    text = write_report(state, store, tmp_path).read_text()
    assert "not evaluated" in text and "Not evaluated: no adapter to serve yet" in text
    assert "adapter/adapter.tar" in text  # the lineage lists the stages that have not run


def test_a_migration_that_failed_before_its_first_iteration_renders_its_reason(
    store: LocalStore, tmp_path: Path
) -> None:
    state = MigrationState(
        migration_id="broken-data",
        spec=make_spec(),
        status="failed",
        failure_reason="invalid_dataset",
        failure_detail="coverage.jsonl line 3: <bad> row",
    )
    assert render_figures(build_report_data(state, store)) == []
    text = write_report(state, store, tmp_path).read_text()
    assert "invalid_dataset" in text and "coverage.jsonl line 3: &lt;bad&gt; row" in text
    assert "No iteration started." in text


# -- the command ---------------------------------------------------------------------------------------------------


class _FakeClient:
    """Stands in for `llamaduo.client.Client`: the states it knows, no bus."""

    states: dict[str, MigrationState] = {}

    def __init__(self, bus: object, store: object) -> None:
        pass

    async def __aenter__(self) -> _FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def status(self, migration_id: str) -> MigrationState | None:
        return self.states.get(migration_id)


@pytest.fixture
def cli_store(monkeypatch: pytest.MonkeyPatch, store: LocalStore, built: Built) -> Built:
    monkeypatch.setenv("LLAMADUO_STORE_URL", f"file://{store.root}")
    # `llamaduo.cli.app` the attribute is the Typer app; the module is what holds `Client`.
    monkeypatch.setattr(importlib.import_module("llamaduo.cli.app"), "Client", _FakeClient)
    monkeypatch.setattr(_FakeClient, "states", {MIGRATION_ID: built.state})
    return built


def test_the_command_writes_the_page_and_charts_and_prints_their_paths(cli_store: Built, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", MIGRATION_ID, "--out", str(out), "--gpu-usd-per-hour", "10"])
    assert result.exit_code == 0, result.output
    names = ["report.html", "metric-similarity.png", "metric-precision.png", "dataset.png", "spend.png"]
    assert result.output.split() == [str(out / name) for name in names]
    assert all((out / name).is_file() for name in names)
    assert "One GPU never breaks even" in (out / "report.html").read_text()  # the GPU price reached the estimate


def test_the_command_defaults_to_reports_id(cli_store: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", MIGRATION_ID])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports" / MIGRATION_ID / "report.html").is_file()


@pytest.mark.parametrize(
    ("migration_id", "message"),
    [
        ("no-such-migration", "no migration 'no-such-migration'"),
        ("Bad id", "not a migration id"),
        ("[/bold]x", "'[/bold]x' is not a migration id"),  # printed as text, not read as console markup
    ],
)
def test_an_unknown_or_invalid_id_is_a_clear_error(
    cli_store: Built, tmp_path: Path, migration_id: str, message: str
) -> None:
    result = runner.invoke(app, ["report", migration_id, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()
