"""The training task without the bus, on the tiny model and a real `LocalStore`: the adapter artifact and its
manifest, the idempotent re-emit, resuming from a stored checkpoint, continuing from the previous iteration's
adapter, the merged export, data-parallel training under torchrun, and bad input ending in a reason."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import llamaduo_trainer.task as task_module
from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import DatasetReady, MigrationSpec, ModelTrained
from llamaduo.data import MANIFEST_MEDIA_TYPE, DatasetManifest, Shard, dump_jsonl, make_row
from llamaduo.localmodel import load_causal_lm
from llamaduo.store import LocalStore, artifact_key
from llamaduo.store.archive import unpack_dir
from llamaduo.telemetry import get_logger
from llamaduo_trainer.settings import TrainerSettings
from llamaduo_trainer.task import TrainingTask

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("torch_single_thread")]
MIGRATION = "train-task-001"


class Interrupted(Exception):
    """Stands for a worker dying mid-training."""


class Context:
    """The parts of `TaskContext` the training task uses."""

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.log = get_logger("tests.training_task")
        self.steps: list[int] = []
        self.messages: list[str] = []
        self.stop_at_step = stop_at_step

    def progress_reporter(self, stage: str, min_interval_s: float = 1.0) -> Callable[[int, int | None], None]:
        def report(done: int, total: int | None, message: str = "") -> None:
            self.steps.append(done)
            self.messages.append(message)
            if self.stop_at_step is not None and done >= self.stop_at_step:
                raise Interrupted(f"killed at step {done}")

        return report

    async def progress(self, stage: str, done: int, total: int | None, message: str = "") -> None:
        return None


def ctx(context: Context) -> TaskContext:
    return cast(TaskContext, context)


def dataset_event(store: LocalStore, base: Path, iteration: int = 0, **training: Any) -> DatasetReady:
    rows = [make_row(f"Describe change {i} briefly.", f"fix: change {i}", origin="coverage") for i in range(24)]
    train_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "train.jsonl"), dump_jsonl(rows))
    test_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "test.jsonl"), dump_jsonl(rows[:3]))
    manifest = DatasetManifest(
        migration_id=MIGRATION, iteration=iteration, shards=[Shard(ref=train_ref, rows=len(rows), origin="coverage")]
    )
    manifest_ref = store.put_bytes(
        artifact_key(MIGRATION, iteration, "dataset", "manifest.json"),
        manifest.model_dump_json().encode(),
        MANIFEST_MEDIA_TYPE,
    )
    spec = MigrationSpec.model_validate(
        {
            "task": {"name": "t"},
            "coverage": {"uri": "unused"},
            "base_model": {"id": str(base)},
            "training": {"max_steps": 6, "batch_size": 4, "max_length": 64, "checkpoint_steps": 2, **training},
        }
    )
    return DatasetReady(
        migration_id=MIGRATION,
        iteration=iteration,
        spec=spec,
        dataset=manifest_ref,
        test=test_ref,
        train_rows=len(rows),
        synthetic_rows=0,
    )


@pytest.fixture
def settings(tmp_path: Path) -> TrainerSettings:
    return TrainerSettings(work_dir=tmp_path / "work", model_cache=tmp_path / "cache", device="cpu")


def adapter_dir(store: LocalStore, event: ModelTrained, tmp_path: Path, name: str = "unpacked") -> Path:
    return unpack_dir(store.download(event.adapter, tmp_path / f"{name}.tar"), tmp_path / name)


def training_json(store: LocalStore, iteration: int = 0) -> dict[str, Any]:
    path = store.root / artifact_key(MIGRATION, iteration, "adapter", "training.json")
    return cast(dict[str, Any], json.loads(path.read_text()))


async def test_the_adapter_carries_a_manifest_and_a_redelivery_only_reemits(
    store: LocalStore, settings: TrainerSettings, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = dataset_event(store, tiny_model_dir)
    context = Context()
    (trained,) = await TrainingTask(settings, store)(event, ctx(context))
    assert isinstance(trained, ModelTrained) and trained.steps == 6
    # Progress carries the step loss, real tokens per second and the ETA.
    last = context.messages[-1]
    assert last.startswith("loss ") and "tokens/s" in last and "ETA 0s" in last, context.messages
    unpacked = adapter_dir(store, trained, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter_manifest.json"} <= {
        p.name for p in unpacked.iterdir()
    }
    manifest = json.loads((unpacked / "adapter_manifest.json").read_text())
    stored = json.loads((store.root / artifact_key(MIGRATION, 0, "adapter", "manifest.json")).read_text())
    assert manifest == stored
    assert manifest["dataset"]["manifest"]["sha256"] == event.dataset.sha256
    assert [s["sha256"] for s in manifest["dataset"]["shards"]] == [
        s.ref.sha256 for s in DatasetManifest.model_validate_json(store.read_bytes(event.dataset)).shards
    ]
    assert manifest["test_split"] == {"uri": event.test.uri, "sha256": event.test.sha256, "used_for_training": False}
    assert manifest["base_model"]["sha256"] and manifest["training"]["max_steps"] == 6
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["library_versions"])
    assert manifest["loss_curve"] and manifest["tokens_per_second"] > 0 and manifest["peak_memory_bytes"] > 0
    assert manifest["dataset"]["validation_rows"] + manifest["dataset"]["train_rows"] == 24
    # The adapter loads with plain peft.
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, "cpu"), str(unpacked))
    assert model is not None

    def must_not_train(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(task_module, "train_adapter", must_not_train)
    (again,) = await TrainingTask(settings, store)(event, ctx(Context()))
    assert again == trained


async def test_a_redelivered_task_resumes_from_the_stored_checkpoint(
    store: LocalStore, settings: TrainerSettings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    event = dataset_event(store, tiny_model_dir)
    with pytest.raises(Interrupted):
        await TrainingTask(settings, store)(event, ctx(Context(stop_at_step=4)))
    record = json.loads((store.root / artifact_key(MIGRATION, 0, "adapter", "checkpoint.json")).read_text())
    assert record["step"] == 4
    context = Context()
    (trained,) = await TrainingTask(settings, store)(event, ctx(context))
    assert isinstance(trained, ModelTrained) and trained.steps == 6
    assert training_json(store)["resumed_from_step"] == 4
    assert context.steps and min(context.steps) > 4, "finished steps are not run again"


async def test_continuing_from_the_previous_adapter_and_exporting_merged_weights(
    store: LocalStore, settings: TrainerSettings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = dataset_event(store, tiny_model_dir, checkpoint_steps=0)
    (zero,) = await TrainingTask(settings, store)(first, ctx(Context()))
    assert isinstance(zero, ModelTrained)
    second = dataset_event(store, tiny_model_dir, iteration=1, init_from="previous_adapter", export_merged=True)
    (one,) = await TrainingTask(settings, store)(second, ctx(Context()))
    assert isinstance(one, ModelTrained)
    manifest = json.loads((adapter_dir(store, one, tmp_path, "one") / "adapter_manifest.json").read_text())
    assert manifest["init_from"] == "previous_adapter"
    assert manifest["previous_adapter"]["sha256"] == zero.adapter.sha256
    merged_tar = store.root / artifact_key(MIGRATION, 1, "adapter", "merged.tar")
    with tarfile.open(merged_tar) as tar:
        assert "config.json" in tar.getnames()
    merged_dir = unpack_dir(merged_tar, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, "cpu"), str(adapter_dir(store, one, tmp_path)))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


async def test_continuing_without_a_previous_adapter_fails_with_a_reason(
    store: LocalStore, settings: TrainerSettings, tiny_model_dir: Path
) -> None:
    event = dataset_event(store, tiny_model_dir, iteration=1, init_from="previous_adapter")
    with pytest.raises(TaskError) as failure:
        await TrainingTask(settings, store)(event, ctx(Context()))
    assert failure.value.reason == "previous_adapter_missing"


async def test_a_missing_base_model_fails_with_base_model_not_found(
    store: LocalStore, settings: TrainerSettings, tmp_path: Path
) -> None:
    event = dataset_event(store, tmp_path / "no-such-model")
    with pytest.raises(TaskError) as failure:
        await TrainingTask(settings, store)(event, ctx(Context()))
    assert failure.value.reason == "base_model_not_found"
    assert "no-such-model" in failure.value.detail


@pytest.mark.slow
async def test_data_parallel_training_on_two_processes(store: LocalStore, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = TrainerSettings(
        work_dir=tmp_path / "work",
        model_cache=tmp_path / "cache",
        device="cpu",
        trainer_num_processes=2,
        trainer_launcher="torchrun",
        store_url=store.root.as_uri(),
    )
    event = dataset_event(store, tiny_model_dir, checkpoint_steps=3)
    context = Context()
    (trained,) = await TrainingTask(settings, store)(event, ctx(context))
    assert isinstance(trained, ModelTrained) and trained.steps == 6
    assert context.steps and max(context.steps) == 6, "process 0's progress reached the task"
    record = json.loads((store.root / artifact_key(MIGRATION, 0, "adapter", "checkpoint.json")).read_text())
    assert record["step"] in (3, 6), "process 0 uploaded checkpoints"
    unpacked = adapter_dir(store, trained, tmp_path)
    assert (unpacked / "adapter_model.safetensors").is_file()
