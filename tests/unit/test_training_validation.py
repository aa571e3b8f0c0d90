"""The validation split, evaluation cadence, early stopping and keeping the best adapter rather than the last."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data import parse_jsonl
from llamaduo.data.rows import ChatRow
from llamaduo_trainer.examples import split_validation, validation_size
from llamaduo_trainer.finetune import eval_interval, planned_steps, train_adapter
from llamaduo_trainer.sft import LlamaDuoSFTTrainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "coverage.jsonl"
FAST = TrainingSpec(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant")

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def rows() -> list[ChatRow]:
    return parse_jsonl(EXAMPLE.read_bytes(), str(EXAMPLE))[:12]


@pytest.mark.parametrize(
    ("rows", "fraction", "expected"),
    [(4, 0.5, 0), (5, 0.1, 1), (5, 0.0, 0), (10, 0.1, 1), (12, 0.5, 6), (100, 0.1, 10), (1000, 0.05, 50)],
)
def test_validation_size(rows: int, fraction: float, expected: int) -> None:
    assert validation_size(rows, fraction) == expected


def test_the_split_is_seeded_disjoint_and_complete(rows: list[ChatRow]) -> None:
    train, held_out = split_validation(rows, 0.25, seed=7)
    assert len(held_out) == 3 and len(train) == 9
    assert {id(r) for r in train} | {id(r) for r in held_out} == {id(r) for r in rows}
    assert not {id(r) for r in train} & {id(r) for r in held_out}
    assert split_validation(rows, 0.25, seed=7) == (train, held_out)
    assert split_validation(rows, 0.25, seed=8)[1] != held_out


def test_evaluations_default_to_about_ten_per_run() -> None:
    spec = TrainingSpec(epochs=3, batch_size=4, gradient_accumulation_steps=2)
    assert planned_steps(800, spec) == 300  # 100 optimizer steps an epoch
    assert eval_interval(800, spec) == 30
    assert eval_interval(8, spec) == 1  # 3 steps: evaluate every one
    assert eval_interval(800, spec.model_copy(update={"eval_steps": 7})) == 7
    assert planned_steps(800, spec.model_copy(update={"max_steps": 12})) == 12
    assert planned_steps(800, spec, processes=4) == 75


def test_eval_steps_set_the_validation_cadence(rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path) -> None:
    training = FAST.model_copy(update={"max_steps": 5, "eval_steps": 2, "validation_fraction": 0.25})
    result = train_adapter(tiny_model_dir, rows, tmp_path, lora=LoraSpec(), training=training, device="cpu")
    # Every 2 steps, and once more at the end.
    assert [step for step, _ in result.eval_history] == [2, 4, 5]
    assert (result.train_rows, result.validation_rows) == (9, 3)


def test_no_validation_at_fraction_zero_keeps_the_last_state(
    rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path
) -> None:
    training = FAST.model_copy(update={"validation_fraction": 0.0})
    result = train_adapter(tiny_model_dir, rows, tmp_path, lora=LoraSpec(), training=training, device="cpu")
    assert result.eval_history == [] and result.eval_loss is None and result.best_step is None
    assert (result.train_rows, result.validation_rows) == (12, 0)
    assert not any(key.startswith("eval_") for entry in result.log_history for key in entry)


def test_too_few_rows_train_without_validation(rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path) -> None:
    result = train_adapter(tiny_model_dir, rows[:4], tmp_path, lora=LoraSpec(), training=FAST, device="cpu")
    assert (result.train_rows, result.validation_rows, result.eval_loss) == (4, 0, None)


@pytest.fixture
def scripted_eval_losses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Make each evaluation report the next loss of the list (one validation batch per evaluation)."""
    losses: list[float] = []
    original = LlamaDuoSFTTrainer.compute_loss

    def compute_loss(
        self: LlamaDuoSFTTrainer, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Any:
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training:
            return loss
        return loss * 0 + losses.pop(0)

    monkeypatch.setattr(LlamaDuoSFTTrainer, "compute_loss", compute_loss)
    yield losses


def _lora_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def test_early_stopping_keeps_the_best_adapter_not_the_last(
    rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path, scripted_eval_losses: list[float]
) -> None:
    training = FAST.model_copy(
        update={"max_steps": 8, "eval_steps": 1, "validation_fraction": 0.1, "early_stopping_patience": 2}
    )
    lora = LoraSpec(dropout=0.0)
    # Best at step 2, then two evaluations without improvement: stop after step 4.
    scripted_eval_losses[:] = [3.0, 2.0, 2.5, 2.6, 9.0, 9.0, 9.0, 9.0]
    result = train_adapter(tiny_model_dir, rows, tmp_path / "stopped", lora=lora, training=training, device="cpu")
    assert result.stopped_early and result.steps == 4
    assert (result.best_step, result.eval_loss) == (2, 2.0)
    assert result.eval_history == [(1, 3.0), (2, 2.0), (3, 2.5), (4, pytest.approx(2.6))]

    # The same run cut at step 2 (same data, seed and schedule) ends with the weights the best step had.
    scripted_eval_losses[:] = [3.0, 2.0]
    short = train_adapter(
        tiny_model_dir,
        rows,
        tmp_path / "two-steps",
        lora=lora,
        training=training.model_copy(update={"max_steps": 2}),
        device="cpu",
    )
    assert short.steps == 2 and short.best_step == 2
    kept, at_step_2 = _lora_weights(tmp_path / "stopped"), _lora_weights(tmp_path / "two-steps")
    assert kept.keys() == at_step_2.keys()
    for name, tensor in kept.items():
        assert torch.allclose(tensor, at_step_2[name], atol=1e-6), name
    assert math.isfinite(result.loss_history[-1][1])
