"""The training benches must keep running: the GPU check's training half in smoke mode, the CPU bench's data."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, cast

import pytest

from llamaduo.localmodel import load_tokenizer
from tests.bench import gpu_check, train_throughput

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_gpu_check_smoke_runs_the_training_half_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check.main(["--smoke", "--half", "training"])
    out = capsys.readouterr().out
    assert "reference: trl SFTTrainer, padded" in out
    assert "ours: train_adapter, padding-free" in out
    assert "training ratio (ours / reference)" in out
    assert "inference ratio" not in out


def test_mfu_peaks_are_known_for_the_usual_gpus() -> None:
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.bf16_peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_train_bench_rows_are_log_normal_around_120_tokens(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer(smollm2_dir)
    rows = train_throughput.make_rows(60, tokenizer)
    lengths = [
        len(
            cast(Any, tokenizer.apply_chat_template(row.model_dump()["messages"], tokenize=True, return_dict=True))[
                "input_ids"
            ]
        )
        for row in rows
    ]
    assert 100 <= statistics.median(lengths) <= 145
    assert max(lengths) > 1.5 * min(lengths)  # spread out: padding has something to waste
    total, answer = train_throughput.real_tokens(rows, tokenizer, 512)
    assert total == sum(lengths) and 0.05 < answer / total < 0.5
