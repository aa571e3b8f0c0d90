"""The GPU check must still run when a GPU shows up: its smoke mode exercises the whole script on the CPU."""

from __future__ import annotations

import pytest

from tests.bench import gpu_check

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_gpu_check_smoke_runs_both_ways_and_prints_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check.main(["--smoke"])
    out = capsys.readouterr().out
    assert "reference: generate, 8 prompts a batch" in out
    assert "ours: continuous batching" in out
    assert "inference ratio (ours / reference)" in out
