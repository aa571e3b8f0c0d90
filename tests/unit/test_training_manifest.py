"""What the adapter manifest records (base model fingerprint, library versions) and the merged export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data import parse_jsonl
from llamaduo.localmodel import load_causal_lm
from llamaduo_trainer.finetune import TrainingError, base_model_fingerprint, merge_adapter, train_adapter
from llamaduo_trainer.manifest import library_versions

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "coverage.jsonl"

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_a_directory_fingerprint_covers_config_and_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    fingerprint = base_model_fingerprint(tiny_model_dir)
    assert fingerprint["id"] == str(tiny_model_dir)
    assert len(fingerprint["sha256"]) == 64
    assert fingerprint["hashed"] == "config, weight names, sizes and contents"  # a tiny model: hashed in full
    assert base_model_fingerprint(tiny_model_dir) == fingerprint

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert base_model_fingerprint(copy)["sha256"] == fingerprint["sha256"]
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same name and size, one bit of a weight changed
    weights.write_bytes(bytes(data))
    assert base_model_fingerprint(copy)["sha256"] != fingerprint["sha256"]
    shutil.copy(tiny_model_dir / "model.safetensors", weights)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("64", "65", 1))
    assert base_model_fingerprint(copy)["sha256"] != fingerprint["sha256"]


def test_an_uncached_hub_id_is_fingerprinted_by_its_id() -> None:
    fingerprint = base_model_fingerprint("llamaduo-test/no-such-model")
    assert fingerprint["id"] == "llamaduo-test/no-such-model"
    assert fingerprint["commit"].startswith("unknown")
    assert "sha256" not in fingerprint


def test_library_versions_name_the_training_stack() -> None:
    versions = library_versions()
    assert {"torch", "transformers", "peft", "trl", "accelerate"} <= set(versions)
    assert versions["torch"] == torch.__version__
    assert all(isinstance(value, str) and value for value in versions.values())


def test_merged_model_loads_plainly_and_computes_base_plus_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = parse_jsonl(EXAMPLE.read_bytes(), str(EXAMPLE))[:8]
    training = TrainingSpec(max_steps=2, learning_rate=1e-2, warmup_ratio=0.0, validation_fraction=0.0)
    train_adapter(tiny_model_dir, rows, tmp_path / "adapter", lora=LoraSpec(), training=training, device="cpu")

    merged_dir = merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    assert merged_dir == tmp_path / "merged"
    names = {path.name for path in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not any(name.startswith("adapter_") for name in names)

    inputs = torch.tensor([[1, 2, 3, 4, 5, 6]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True)
    adapted = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, "cpu"), str(tmp_path / "adapter"))
    base = load_causal_lm(tiny_model_dir, "cpu")
    with torch.no_grad():
        expected, got, before = adapted(inputs).logits, merged(inputs).logits, base(inputs).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, before, atol=1e-4)


def test_merging_something_that_is_no_adapter_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="holds no PEFT adapter"):
        merge_adapter(tiny_model_dir, tmp_path, tmp_path / "merged")


def test_the_training_meter_reports_loss_tokens_per_second_and_eta() -> None:
    from llamaduo_trainer.task import TrainingMeter

    meter = TrainingMeter()
    meter.tokens(100)
    assert meter.message(1, 11, 2.5, now=10.0) == "loss 2.500"
    meter.tokens(600)
    # 5 steps and 500 real tokens in 10 s: 50 tokens/s, 2 s a step, 5 steps left.
    assert meter.message(6, 11, 2.25, now=20.0) == "loss 2.250, 50 tokens/s, ETA 10s"
    meter.tokens(1100)
    assert meter.message(11, 11, None, now=30.0) == "50 tokens/s, ETA 0s"
