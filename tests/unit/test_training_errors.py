"""Runs that can never succeed fail with `TrainingError`: a machine-readable reason and a message to act on."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, T5Config

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data import parse_jsonl
from llamaduo.data.rows import ChatRow
from llamaduo_trainer.errors import REASONS, TrainingError, is_out_of_memory
from llamaduo_trainer.finetune import train_adapter
from llamaduo_trainer.sft import LlamaDuoSFTTrainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "coverage.jsonl"
FAST = TrainingSpec(
    max_steps=4, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", validation_fraction=0.0
)
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "8589934592 bytes. Error code 12 (Cannot allocate memory)"
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def rows() -> list[ChatRow]:
    return parse_jsonl(EXAMPLE.read_bytes(), str(EXAMPLE))[:8]


def _train(model: Path | str, rows: list[ChatRow], out: Path, **changes: Any) -> None:
    training = FAST.model_copy(update=changes)
    train_adapter(model, rows, out, lora=LoraSpec(), training=training, device="cpu")


def _reason(caught: pytest.ExceptionInfo[TrainingError]) -> str:
    return caught.value.reason


def test_a_missing_directory_is_base_model_not_found(rows: list[ChatRow], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"base model .*no-such-model: no such directory") as caught:
        _train(tmp_path / "no-such-model", rows, tmp_path / "out")
    assert _reason(caught) == "base_model_not_found"


def test_a_directory_without_config_is_base_model_not_found(rows: list[ChatRow], tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(TrainingError, match="has no config.json") as caught:
        _train(tmp_path / "model", rows, tmp_path / "out")
    assert _reason(caught) == "base_model_not_found"


def test_a_hub_id_that_is_not_cached_is_base_model_not_found(rows: list[ChatRow], tmp_path: Path) -> None:
    # HF_HUB_OFFLINE is set for the test session (tests/conftest.py), as in the services: the cache or nothing.
    with pytest.raises(
        TrainingError, match=r"'llamaduo-test/no-such-model' is neither .* nor a hub id in the local cache"
    ) as caught:
        _train("llamaduo-test/no-such-model", rows, tmp_path / "out")
    assert _reason(caught) == "base_model_not_found"


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
            "BertForMaskedLM",
        ),
        (T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=37), "T5ForConditionalGeneration"),
    ],
    ids=["bert", "t5"],
)
def test_an_encoder_or_seq2seq_model_is_not_a_causal_lm(
    rows: list[ChatRow], tmp_path: Path, config: Any, named: str
) -> None:
    config.architectures = [named]
    config.save_pretrained(tmp_path / "model")  # a config alone: refused before any weight would be read
    with pytest.raises(TrainingError, match=rf"saved as {named}\) is not a causal language model") as caught:
        _train(tmp_path / "model", rows, tmp_path / "out")
    assert _reason(caught) == "not_a_causal_lm"


def test_rows_without_answer_tokens_are_no_trainable_tokens(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path
) -> None:
    long_prompt = ChatRow.model_validate(
        {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    )
    with pytest.raises(TrainingError, match="leaving no answer token to train on; raise training.max_length") as caught:
        _train(tiny_model_dir, [long_prompt] * 3, tmp_path / "out", max_length=128)
    assert _reason(caught) == "no_trainable_tokens"


def test_paged_adamw_8bit_needs_cuda(tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="paged_adamw_8bit needs a CUDA GPU") as caught:
        _train(tiny_model_dir, rows, tmp_path / "out", optimizer="paged_adamw_8bit")
    assert _reason(caught) == "invalid_training_config"


def test_an_init_adapter_that_is_no_adapter_is_refused(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match="holds no PEFT adapter") as caught:
        train_adapter(
            tiny_model_dir, rows, tmp_path / "out", lora=LoraSpec(), training=FAST, device="cpu", init_adapter=tmp_path
        )
    assert _reason(caught) == "invalid_training_config"


LossPatch = Callable[[LlamaDuoSFTTrainer, torch.Tensor], torch.Tensor]


@pytest.fixture
def patch_training_loss(monkeypatch: pytest.MonkeyPatch) -> Callable[[LossPatch], None]:
    """Replace the training loss by `patch(trainer, loss)` (the optimizer step being computed is global_step + 1)."""

    def install(patch: LossPatch) -> None:
        original = LlamaDuoSFTTrainer.compute_loss

        def compute_loss(self: LlamaDuoSFTTrainer, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            loss = original(self, model, *args, **kwargs)
            return patch(self, loss) if model.training else loss

        monkeypatch.setattr(LlamaDuoSFTTrainer, "compute_loss", compute_loss)

    return install


@pytest.mark.parametrize(
    "error",
    [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), RuntimeError(CPU_OOM)],
    ids=["cuda", "cpu-allocator"],
)
def test_out_of_memory_names_the_settings_to_lower(
    tiny_model_dir: Path,
    rows: list[ChatRow],
    tmp_path: Path,
    patch_training_loss: Callable[[LossPatch], None],
    error: Exception,
) -> None:
    def allocate(trainer: LlamaDuoSFTTrainer, loss: torch.Tensor) -> torch.Tensor:
        raise error

    patch_training_loss(allocate)
    with pytest.raises(TrainingError) as caught:
        _train(tiny_model_dir, rows, tmp_path / "out", gradient_accumulation_steps=2, max_length=256)
    assert _reason(caught) == "out_of_memory"
    message = str(caught.value)
    assert "batch_size=4, gradient_accumulation_steps=2, max_length=256" in message
    assert "lower training.batch_size=4" in message and "training.max_length=256" in message
    assert "gradient_checkpointing on" in message  # off by default on a CPU: turning it on is one more way out
    assert not (tmp_path / "out").exists()


def test_a_nan_loss_is_training_diverged(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path, patch_training_loss: Callable[[LossPatch], None]
) -> None:
    patch_training_loss(lambda trainer, loss: loss * float("nan") if trainer.state.global_step >= 1 else loss)
    steps: list[int] = []
    with pytest.raises(TrainingError, match=r"diverged at step 2: the loss is nan; lower training.learning_rate") as e:
        train_adapter(
            tiny_model_dir,
            rows,
            tmp_path / "out",
            lora=LoraSpec(),
            training=FAST,
            device="cpu",
            on_step=lambda step, total, loss: steps.append(step),
        )
    assert _reason(e) == "training_diverged"
    assert steps == [1]  # the diverged step is not reported as progress, and no later step runs
    assert not (tmp_path / "out").exists()


def test_a_loss_ten_times_the_first_is_training_diverged(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path, patch_training_loss: Callable[[LossPatch], None]
) -> None:
    patch_training_loss(lambda trainer, loss: loss * 50 if trainer.state.global_step >= 2 else loss)
    with pytest.raises(TrainingError, match=r"diverged at step 3: the loss is .*more than 10x the first") as caught:
        _train(tiny_model_dir, rows, tmp_path / "out")
    assert _reason(caught) == "training_diverged"
    assert "lower training.learning_rate (now 0.01)" in str(caught.value)


def test_a_spike_during_warmup_is_tolerated(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path, patch_training_loss: Callable[[LossPatch], None]
) -> None:
    # warmup 0.5 of 4 steps: steps 1-2 warm up; a spike at step 2 is no divergence (a NaN would be).
    patch_training_loss(lambda trainer, loss: loss * 50 if trainer.state.global_step == 1 else loss)
    _train(tiny_model_dir, rows, tmp_path / "out", warmup_ratio=0.5)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_out_of_memory_is_told_apart_from_other_runtime_errors() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError(CPU_OOM))
    assert is_out_of_memory(RuntimeError("cuBLAS error: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_a_training_error_keeps_its_reason_across_processes() -> None:
    error: TrainingError = pickle.loads(pickle.dumps(TrainingError("out_of_memory", "lower training.batch_size")))
    assert isinstance(error, ValueError)
    assert (error.reason, str(error)) == ("out_of_memory", "lower training.batch_size")
    assert set(REASONS) == {
        "base_model_not_found",
        "not_a_causal_lm",
        "no_trainable_tokens",
        "out_of_memory",
        "training_diverged",
        "invalid_training_config",
    }
