"""The chaos suite: fault schedules against real servers. `make chaos` runs the full schedule (LLAMADUO_CHAOS=full);
`make test` runs the short form. Every test here is marked `chaos`; the session ends with the table of results."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.chaos.tally import TALLY, ScenarioTally
from tests.support.servers import any_store, nats_server, s3_endpoint

__all__ = ["any_store", "nats_server", "s3_endpoint"]


def full_schedule() -> bool:
    """Whether the full fault schedule runs (`make chaos`), not the short form (`make test`)."""
    return os.environ.get("LLAMADUO_CHAOS", "short").lower() == "full"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The long scenarios (marked `full_schedule`) belong to `make chaos`: the short form deselects them rather
    # than reporting them as skipped.
    kept, dropped = [], []
    for item in items:
        if "/tests/chaos/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.chaos)
        if item.get_closest_marker("full_schedule") is not None and not full_schedule():
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.when == "call" or (report.when == "setup" and report.failed):
        item.stash[_OUTCOME] = report.passed
    return report


_OUTCOME = pytest.StashKey[bool]()


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[ScenarioTally]:
    """This test's row of the closing table (named by the test's `scenario` marker, else the test's name)."""
    marker = request.node.get_closest_marker("scenario")
    name = marker.args[0] if marker else request.node.name.removeprefix("test_")
    tally = TALLY.scenario(name)
    yield tally
    outcome = request.node.stash.get(_OUTCOME, None)
    if outcome is not None:
        tally.passed = outcome if tally.passed is None else tally.passed and outcome


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "scenario(name): the chaos table row a test reports into")
    config.addinivalue_line("markers", "full_schedule: runs only in the full fault schedule (make chaos)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.scenarios:
        mode = "full schedule" if full_schedule() else "short form (LLAMADUO_CHAOS=full for the full schedule)"
        terminalreporter.write_sep("=", f"chaos suite: {mode}")
        terminalreporter.write_line(TALLY.table())
