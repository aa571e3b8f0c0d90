"""Padding-free batching (`training.packing`): packed rows never see each other, and the loss is the rows' loss."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, cast

import datasets
import pytest
import torch

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data import parse_jsonl
from llamaduo.data.rows import ChatRow
from llamaduo.localmodel import load_causal_lm
from llamaduo_trainer.attention import VARLEN_SDPA, use_varlen_sdpa
from llamaduo_trainer.finetune import build_sft_trainer, train_adapter
from llamaduo_trainer.sft import LlamaDuoSFTTrainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "coverage.jsonl"
FAST = TrainingSpec(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant")

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def rows() -> list[ChatRow]:
    return parse_jsonl(EXAMPLE.read_bytes(), str(EXAMPLE))[:8]


def _token_rows(count: int = 4, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 1000) for _ in range(rng.randrange(9, 40))] for _ in range(count)]


def _padding_free(rows: list[list[int]]) -> dict[str, Any]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return dict(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows]))


def _logits(model: Any, batch: dict[str, Any], **extra: Any) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        return cast(torch.Tensor, model(**inputs, **extra).logits)


@pytest.mark.parametrize("attention", ["sdpa", VARLEN_SDPA])
def test_packed_rows_do_not_attend_to_each_other(tiny_model_dir: Path, attention: str) -> None:
    model = load_causal_lm(tiny_model_dir, "cpu", torch.float32)
    if attention == VARLEN_SDPA:
        assert use_varlen_sdpa(model)
    assert model.config._attn_implementation == attention
    rows = _token_rows()
    one_by_one = [_logits(model, {"input_ids": torch.tensor([row])}, use_cache=False)[0] for row in rows]
    packed = torch.split(_logits(model, _padding_free(rows), use_cache=False)[0], [len(row) for row in rows])
    for alone, together in zip(one_by_one, packed, strict=True):
        assert torch.allclose(alone, together, atol=1e-5), (alone - together).abs().max()


def test_stock_sdpa_mixes_packed_rows_when_a_cache_is_on_and_varlen_never_does(tiny_model_dir: Path) -> None:
    # transformers 5 only derives the block-diagonal mask from position_ids when no cache is passed; the varlen
    # attention reads the row boundaries the collator sends, so it is right either way.
    model = load_causal_lm(tiny_model_dir, "cpu", torch.float32)
    rows = _token_rows()
    batch = _padding_free(rows)
    alone = _logits(model, {"input_ids": torch.tensor([rows[1]])}, use_cache=False)[0]
    start = len(rows[0])
    stock = _logits(model, batch, use_cache=True)[0, start : start + len(rows[1])]
    assert not torch.allclose(alone, stock, atol=1e-3)
    use_varlen_sdpa(model)
    varlen = _logits(model, batch, use_cache=True)[0, start : start + len(rows[1])]
    assert torch.allclose(alone, varlen, atol=1e-5)


def test_varlen_attention_is_plain_sdpa_on_padded_batches(tiny_model_dir: Path) -> None:
    model = load_causal_lm(tiny_model_dir, "cpu", torch.float32)
    rows = _token_rows()
    width = max(map(len, rows))
    padded = {
        "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
    }
    stock = _logits(model, padded, use_cache=False)
    use_varlen_sdpa(model)
    varlen = _logits(model, padded, use_cache=False)
    for index, row in enumerate(rows):
        assert torch.allclose(stock[index, : len(row)], varlen[index, : len(row)], atol=1e-6)


def _row_by_row_loss(model: Any, examples: list[dict[str, list[int]]]) -> float:
    """Mean next-token cross-entropy over every labelled token, each row run alone through the plain model."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


@pytest.mark.parametrize("answer_logits_only", [True, False], ids=["answer-positions-head", "trl-fused-head"])
def test_packed_batch_loss_equals_the_rows_run_one_by_one(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path, answer_logits_only: bool
) -> None:
    training = FAST.model_copy(update={"validation_fraction": 0.0})
    lora = LoraSpec(dropout=0.0)
    trainer, _ = build_sft_trainer(tiny_model_dir, rows[:4], tmp_path, lora=lora, training=training, device="cpu")
    ours = cast(LlamaDuoSFTTrainer, trainer)
    assert ours.answer_logits_only  # the CPU default
    ours.answer_logits_only = answer_logits_only
    dataset = cast(datasets.Dataset, trainer.train_dataset)
    examples = [dataset[index] for index in range(4)]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == 1  # one padding-free sequence
    model = cast(torch.nn.Module, trainer.model)
    model.eval()
    with torch.no_grad():
        packed = float(cast(Any, trainer).compute_loss(model, dict(batch)))
    reference = load_causal_lm(tiny_model_dir, "cpu", torch.float32)
    # A fresh LoRA changes nothing yet (lora_B is zero): the adapted model computes the base model's function.
    assert math.isclose(packed, _row_by_row_loss(reference, examples), rel_tol=1e-5)


def test_answer_positions_head_gives_trls_loss_and_gradients(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path
) -> None:
    training = FAST.model_copy(update={"validation_fraction": 0.0})
    trainer, _ = build_sft_trainer(
        tiny_model_dir, rows[:4], tmp_path, lora=LoraSpec(dropout=0.0), training=training, device="cpu"
    )
    ours = cast(LlamaDuoSFTTrainer, trainer)
    model = cast(torch.nn.Module, trainer.model)
    with torch.no_grad():  # make lora_B non-zero, so the gradients reach lora_A too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    dataset = cast(datasets.Dataset, trainer.train_dataset)
    batch = trainer.data_collator([dataset[index] for index in range(4)])
    items = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    results = []
    for answer_only in (True, False):
        ours.answer_logits_only = answer_only
        model.zero_grad()
        loss = cast(Any, trainer).compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(items))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
    (ours_loss, ours_grads), (trl_loss, trl_grads) = results
    assert math.isclose(ours_loss, trl_loss, rel_tol=1e-5)
    assert ours_grads.keys() == trl_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, trl_grads[name], rtol=1e-4, atol=1e-7), name


def test_packing_on_and_off_train_the_same_run(tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path) -> None:
    # Padding-free keeps batch_size rows per micro-batch and the data order: it changes the speed, not the run.
    # (Without LoRA dropout: its random masks are drawn over differently shaped batches.)
    histories = {}
    for packing in (True, False):
        training = FAST.model_copy(update={"packing": packing, "gradient_accumulation_steps": 2})
        result = train_adapter(
            tiny_model_dir, rows, tmp_path / str(packing), lora=LoraSpec(dropout=0.0), training=training, device="cpu"
        )
        assert result.packing is packing
        histories[packing] = (result.loss_history, result.eval_history, result.tokens)
    (packed_loss, packed_eval, packed_tokens), (padded_loss, padded_eval, padded_tokens) = histories.values()
    assert packed_tokens == padded_tokens  # real tokens: padding is never counted
    for (step, loss), (other_step, other) in zip(packed_loss + packed_eval, padded_loss + padded_eval, strict=True):
        assert step == other_step and math.isclose(loss, other, rel_tol=1e-4)


def test_gradient_checkpointing_defaults_off_on_cpu_and_follows_the_spec(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path
) -> None:
    for setting, expected in ((None, False), (True, True), (False, False)):
        training = FAST.model_copy(update={"gradient_checkpointing": setting})
        trainer, _ = build_sft_trainer(tiny_model_dir, rows, tmp_path, lora=LoraSpec(), training=training, device="cpu")
        assert trainer.args.gradient_checkpointing is expected
