"""Checkpoints every `training.checkpoint_steps`, resuming an interrupted run, and continuing a previous adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data import parse_jsonl
from llamaduo.data.rows import ChatRow
from llamaduo_trainer.finetune import TrainingError, build_sft_trainer, train_adapter

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "coverage.jsonl"
TRAINING = TrainingSpec(
    max_steps=6, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="linear", checkpoint_steps=2
)
CHECKPOINT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
}

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def rows() -> list[ChatRow]:
    return parse_jsonl(EXAMPLE.read_bytes(), str(EXAMPLE))[:12]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


class Interrupted(Exception):
    pass


def test_a_checkpoint_every_n_steps_handed_over_complete_and_only_the_latest_kept(
    rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path
) -> None:
    seen: list[tuple[str, int, set[str], list[str]]] = []
    checkpoints = tmp_path / "checkpoints"

    def on_checkpoint(folder: Path, step: int) -> None:
        present = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
        seen.append((folder.name, step, {p.name for p in folder.iterdir()}, present))

    training = TRAINING.model_copy(update={"max_steps": 5})
    result = train_adapter(
        tiny_model_dir,
        rows,
        tmp_path / "adapter",
        lora=LoraSpec(),
        training=training,
        device="cpu",
        checkpoint_dir=checkpoints,
        on_checkpoint=on_checkpoint,
    )
    assert result.steps == 5
    assert [(name, step) for name, step, _, _ in seen] == [("checkpoint-2", 2), ("checkpoint-4", 4)]
    for name, _, files, present in seen:
        # Adapter, optimizer, scheduler, RNG and trainer state, and the best adapter so far (validation is on).
        assert CHECKPOINT_FILES | {"best_adapter.safetensors", "best_adapter.json"} <= files
        assert present == [name]
    # No extra save for the last step (5 is not a checkpoint step): the adapter itself follows.
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_no_checkpoints_without_a_checkpoint_dir_or_at_zero_steps(
    rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path
) -> None:
    calls: list[int] = []
    training = TRAINING.model_copy(update={"max_steps": 2, "checkpoint_steps": 0})
    train_adapter(
        tiny_model_dir,
        rows,
        tmp_path / "adapter",
        lora=LoraSpec(),
        training=training,
        device="cpu",
        checkpoint_dir=tmp_path / "checkpoints",
        on_checkpoint=lambda folder, step: calls.append(step),
    )
    assert calls == [] and not list((tmp_path / "checkpoints").glob("checkpoint-*"))


def test_an_interrupted_run_resumed_from_its_checkpoint_ends_like_an_uninterrupted_one(
    rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path
) -> None:
    lora = LoraSpec()  # with dropout: its random masks must continue from the checkpoint's RNG state too
    whole = train_adapter(tiny_model_dir, rows, tmp_path / "whole", lora=lora, training=TRAINING, device="cpu")

    events: list[tuple[str, int]] = []

    def stop_at_4(step: int, total: int, loss: float | None) -> None:
        events.append(("step", step))
        if step == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_adapter(
            tiny_model_dir,
            rows,
            tmp_path / "cut",
            lora=lora,
            training=TRAINING,
            device="cpu",
            on_step=stop_at_4,
            checkpoint_dir=tmp_path / "first-worker",
            on_checkpoint=lambda folder, step: events.append(("checkpoint", step)),
        )
    assert not (tmp_path / "cut").exists()
    # A checkpoint step is reported after its checkpoint was handed over: stopping there loses nothing.
    assert events == [("step", 1), ("checkpoint", 2), ("step", 2), ("step", 3), ("checkpoint", 4), ("step", 4)]
    # Another worker gets the stored checkpoint (here: a copy) and continues the run.
    resume_from = shutil.copytree(tmp_path / "first-worker" / "checkpoint-4", tmp_path / "store" / "checkpoint-4")
    steps: list[int] = []
    resumed = train_adapter(
        tiny_model_dir,
        rows,
        tmp_path / "resumed",
        lora=lora,
        training=TRAINING,
        device="cpu",
        on_step=lambda step, total, loss: steps.append(step),
        checkpoint_dir=tmp_path / "second-worker",
        resume_from=resume_from,
    )
    assert steps == [5, 6] and resumed.steps == whole.steps == 6
    # Same data order, schedule and random state: the same losses, validation losses and adapter.
    assert [s for s, _ in resumed.loss_history] == [1, 2, 3, 4, 5, 6]
    for (_, loss), (_, expected) in zip(resumed.loss_history, whole.loss_history, strict=True):
        assert loss == pytest.approx(expected, rel=1e-4)
    assert [s for s, _ in resumed.eval_history] == [s for s, _ in whole.eval_history]
    assert [loss for _, loss in resumed.eval_history] == pytest.approx(
        [loss for _, loss in whole.eval_history], rel=1e-4
    )
    assert resumed.best_step == whole.best_step
    final, expected_weights = _adapter(tmp_path / "resumed"), _adapter(tmp_path / "whole")
    assert final.keys() == expected_weights.keys()
    for name, tensor in final.items():
        assert torch.allclose(tensor, expected_weights[name], rtol=1e-3, atol=1e-5), name


def test_the_best_adapter_survives_a_resume(rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-4"

    def store(folder: Path, step: int) -> None:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.copytree(folder, checkpoint)

    first = train_adapter(
        tiny_model_dir,
        rows,
        tmp_path / "first",
        lora=LoraSpec(),
        training=TRAINING.model_copy(update={"max_steps": 4}),
        device="cpu",
        checkpoint_dir=tmp_path / "worker",
        on_checkpoint=store,
    )
    assert first.best_step is not None
    # Pretend the stored checkpoint's best was far better than anything the rest of the run reaches.
    meta = json.loads((checkpoint / "best_adapter.json").read_text())
    (checkpoint / "best_adapter.json").write_text(json.dumps({**meta, "eval_loss": -1.0}))
    resumed = train_adapter(
        tiny_model_dir,
        rows,
        tmp_path / "resumed",
        lora=LoraSpec(),
        training=TRAINING,
        device="cpu",
        resume_from=checkpoint,
    )
    assert resumed.steps == 6 and (resumed.best_step, resumed.eval_loss) == (meta["step"], -1.0)
    stored = load_file(checkpoint / "best_adapter.safetensors")
    saved = _adapter(tmp_path / "resumed")
    assert len(stored) == len(saved)
    for name, tensor in stored.items():
        # The trainer's parameter names carry the adapter name ("default"); the saved adapter's do not.
        assert torch.equal(saved[name.replace(".default", "")], tensor), name


def test_resume_from_something_that_is_no_checkpoint_is_refused(
    rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match="not a trainer checkpoint") as caught:
        train_adapter(
            tiny_model_dir, rows, tmp_path / "a", lora=LoraSpec(), training=TRAINING, device="cpu", resume_from=tmp_path
        )
    assert caught.value.reason == "invalid_training_config"


def test_init_adapter_continues_from_the_previous_adapters_weights(
    rows: list[ChatRow], tiny_model_dir: Path, tmp_path: Path
) -> None:
    quick = TRAINING.model_copy(update={"max_steps": 3, "validation_fraction": 0.0, "checkpoint_steps": 0})
    train_adapter(tiny_model_dir, rows, tmp_path / "previous", lora=LoraSpec(), training=quick, device="cpu")
    previous = _adapter(tmp_path / "previous")
    assert all(t.abs().sum() > 0 for n, t in previous.items() if "lora_B" in n)

    trainer, _ = build_sft_trainer(
        tiny_model_dir,
        rows,
        tmp_path / "scratch",
        lora=LoraSpec(),
        training=quick,
        device="cpu",
        init_adapter=tmp_path / "previous",
    )
    model = cast(PeftModel, trainer.model)
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == previous.keys()
    for name, param in loaded.items():
        assert param.requires_grad and torch.equal(param.detach(), previous[name]), name

    # One tiny step later the adapter is still (almost) the previous one, not a fresh LoRA's zero lora_B.
    tiny_step = quick.model_copy(update={"max_steps": 1, "learning_rate": 1e-7})
    train_adapter(
        tiny_model_dir,
        rows,
        tmp_path / "continued",
        lora=LoraSpec(),
        training=tiny_step,
        device="cpu",
        init_adapter=tmp_path / "previous",
    )
    continued = _adapter(tmp_path / "continued")
    for name, tensor in continued.items():
        assert torch.allclose(tensor, previous[name], atol=1e-5) and not torch.equal(tensor, previous[name]), name
