"""LoRA fine-tuning (`llamaduo_trainer.finetune`) on the tiny random model, plus one slow run on SmolLM2.

Validation, packing, checkpoints and failures have their own modules: tests/unit/test_training_*.py.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data import parse_jsonl
from llamaduo.data.rows import ChatRow
from llamaduo.localmodel import load_causal_lm
from llamaduo_trainer.finetune import (
    ADAPTER_FILES,
    CUDA_EXTRA,
    TrainingError,
    TrainResult,
    build_sft_trainer,
    chat_examples,
    choose_precision,
    linear_module_names,
    train_adapter,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "coverage.jsonl"
FAST = TrainingSpec(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant")

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def rows() -> list[ChatRow]:
    return parse_jsonl(EXAMPLE.read_bytes(), str(EXAMPLE))[:8]


def _row(*turns: tuple[str, str]) -> ChatRow:
    return ChatRow.model_validate({"messages": [{"role": role, "content": content} for role, content in turns]})


@dataclass
class Trained:
    result: TrainResult
    out_dir: Path
    steps_seen: list[tuple[int, int, float | None]]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, rows: list[ChatRow], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    out_dir = tmp_path_factory.mktemp("adapter")
    seen: list[tuple[int, int, float | None]] = []
    result = train_adapter(
        tiny_model_dir,
        rows,
        out_dir,
        lora=LoraSpec(),
        training=FAST,
        device="cpu",
        on_step=lambda step, total, loss: seen.append((step, total, loss)),
    )
    return Trained(result, out_dir, seen)


def test_training_reports_finite_loss_and_tokens(trained: Trained) -> None:
    result = trained.result
    assert result.precision == "fp32-lora"
    assert result.steps == 3
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    assert result.tokens > 0 and result.tokens_per_second > 0 and result.seconds > 0
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert [step for step, _ in result.loss_history] == [1, 2, 3]
    assert [loss for _, loss in result.loss_history] == losses


def test_training_holds_out_validation_rows_and_keeps_the_best_adapter(trained: Trained) -> None:
    result = trained.result
    # 8 rows, validation_fraction 0.1: one row held out, evaluated every step (a tenth of 3 steps, at least 1).
    assert (result.train_rows, result.validation_rows) == (7, 1)
    assert [step for step, _ in result.eval_history] == [1, 2, 3]
    best_step, best_loss = min(result.eval_history, key=lambda entry: entry[1])
    assert (result.best_step, result.eval_loss) == (best_step, best_loss)
    assert not result.stopped_early


def test_result_records_memory_versions_and_packing(trained: Trained) -> None:
    result = trained.result
    assert result.packing is True
    assert result.peak_memory_bytes > 50 * 2**20  # a process that loaded torch and a model
    assert {"torch", "transformers", "peft", "trl", "accelerate"} <= set(result.library_versions)
    assert result.library_versions["torch"] == torch.__version__


def test_lora_weights_moved_away_from_their_init(trained: Trained) -> None:
    weights = load_file(trained.out_dir / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in weights.items() if "lora_B" in name}
    # peft initialises every lora_B to zero, so a non-zero lora_B is proof that the optimizer updated it.
    assert lora_b, sorted(weights)
    assert all(tensor.abs().sum() > 0 for tensor in lora_b.values())
    targets = {name.split(".lora_B")[0].rsplit(".", 1)[-1] for name in lora_b}
    assert targets == set(LoraSpec().target_modules)


def test_out_dir_holds_only_the_adapter_and_the_tokenizer(trained: Trained) -> None:
    names = {path.name for path in trained.out_dir.iterdir()}
    assert set(ADAPTER_FILES) <= names
    assert "tokenizer_config.json" in names
    assert not names - set(ADAPTER_FILES) - {"tokenizer_config.json", "tokenizer.json", "chat_template.jinja"}, names


def test_adapter_loads_with_plain_peft(trained: Trained, tiny_model_dir: Path) -> None:
    base = load_causal_lm(tiny_model_dir, "cpu")
    inputs = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(inputs).logits
        model = PeftModel.from_pretrained(base, trained.out_dir)
        after = model(inputs).logits
    assert not torch.allclose(before, after), "the loaded adapter changes nothing"


def test_on_step_is_called_with_increasing_steps(trained: Trained) -> None:
    steps = [step for step, _, _ in trained.steps_seen]
    assert steps == [1, 2, 3]
    assert {total for _, total, _ in trained.steps_seen} == {3}
    assert all(loss is not None and math.isfinite(loss) for _, _, loss in trained.steps_seen)


def test_an_exception_from_on_step_aborts_and_saves_nothing(
    tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path
) -> None:
    class Cancelled(Exception):
        pass

    def on_step(step: int, total: int, loss: float | None) -> None:
        raise Cancelled(f"stop at {step}/{total}")

    out_dir = tmp_path / "adapter"
    with pytest.raises(Cancelled, match="stop at 1/3"):
        train_adapter(tiny_model_dir, rows, out_dir, lora=LoraSpec(), training=FAST, device="cpu", on_step=on_step)
    assert not out_dir.exists()


@pytest.mark.parametrize("packing", [True, False], ids=["padding-free", "padded"])
def test_only_answer_tokens_carry_loss(tiny_model_dir: Path, tmp_path: Path, packing: bool) -> None:
    rows = [
        _row(("user", "Describe: added a flag"), ("assistant", "feat: add flag")),
        _row(
            ("system", "You write commit messages."),
            ("user", "First try"),
            ("assistant", "wip"),
            ("user", "Better: fixed the login crash"),
            ("assistant", "fix: login crash"),
        ),
    ]
    training = FAST.model_copy(update={"packing": packing})
    trainer, _ = build_sft_trainer(tiny_model_dir, rows, tmp_path, lora=LoraSpec(), training=training, device="cpu")
    tokenizer = cast(PreTrainedTokenizerBase, trainer.processing_class)
    dataset = cast(datasets.Dataset, trainer.train_dataset)
    batch = trainer.data_collator([dataset[index] for index in range(len(rows))])
    if packing:
        # One padding-free sequence: the rows end to end, positions restarting at 0 for each, no padding at all.
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert starts == batch["cu_seq_lens_q"][:-1].tolist()
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        sequences = list(zip(ids.tensor_split(starts[1:]), labels.tensor_split(starts[1:]), strict=True))
    else:
        sequences = list(zip(batch["input_ids"], batch["labels"], strict=True))

    def text(ids: torch.Tensor) -> str:
        return str(tokenizer.decode(ids.tolist()))

    assert len(sequences) == len(rows)
    for (input_ids, labels), row in zip(sequences, rows, strict=True):
        trained_ids = input_ids[labels != -100]
        # The loss covers the final answer and the end-of-turn that teaches the model to stop; nothing else: not the
        # system prompt, not the user turns, not the earlier assistant turn, not the padding.
        assert text(trained_ids) == row.reference + "<|im_end|>\n"
        assert torch.equal(labels[labels != -100], trained_ids)
        first = int((labels != -100).nonzero()[0])
        assert (labels[:first] == -100).all()
        assert text(input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_chat_examples_are_conversational_prompt_completion() -> None:
    row = _row(("system", "s"), ("user", "u"), ("assistant", "a"))
    assert chat_examples([row]) == [
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "completion": [{"role": "assistant", "content": "a"}],
        }
    ]


def _build(
    model_dir: Path, tmp_path: Path, rows: list[ChatRow], lora: LoraSpec | None = None, **changes: object
) -> None:
    training = TrainingSpec.model_validate({**FAST.model_dump(), **changes})
    build_sft_trainer(model_dir, rows, tmp_path, lora=lora or LoraSpec(), training=training, device="cpu")


def test_no_rows_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no training rows") as caught:
        _build(tiny_model_dir, tmp_path, [])
    assert caught.value.reason == "no_trainable_tokens"


def test_a_row_without_an_answer_is_rejected(tiny_model_dir: Path, tmp_path: Path, rows: list[ChatRow]) -> None:
    unanswered = _row(("user", "hello?"))
    with pytest.raises(ValueError, match=r"training row 2: the row does not end with an assistant turn"):
        _build(tiny_model_dir, tmp_path, [*rows[:2], unanswered])
    empty = _row(("user", "hello?"), ("assistant", "  "))
    with pytest.raises(ValueError, match=r"training row 0: the assistant turn is empty"):
        _build(tiny_model_dir, tmp_path, [empty])


def test_an_unknown_target_module_lists_the_linear_modules(
    tiny_model_dir: Path, tmp_path: Path, rows: list[ChatRow]
) -> None:
    with pytest.raises(TrainingError, match=r"\['qkv'\] match no Linear layer") as caught:
        _build(tiny_model_dir, tmp_path, rows, lora=LoraSpec(target_modules=["q_proj", "qkv"]))
    assert caught.value.reason == "invalid_training_config"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in str(caught.value)
    assert {"q_proj", "down_proj", "lm_head"} <= set(linear_module_names(tiny_model_dir))


def test_prompts_that_fill_max_length_are_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    long_prompt = _row(("user", "word " * 200), ("assistant", "ok"))
    with pytest.raises(
        TrainingError, match=r"fills training.max_length=64 tokens.*raise training.max_length"
    ) as caught:
        _build(tiny_model_dir, tmp_path, [long_prompt], max_length=64)
    assert caught.value.reason == "no_trainable_tokens"


def test_cut_answers_and_dropped_rows_are_logged(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        _row(("user", "word " * 200), ("assistant", "ok")),
        _row(("user", "short"), ("assistant", "word " * 200)),
        _row(("user", "short"), ("assistant", "ok")),
    ]
    with caplog.at_level("WARNING", logger="llamaduo_trainer.finetune"):
        _build(tiny_model_dir, tmp_path, rows, max_length=64)
    assert "1 of 3 training rows dropped" in caplog.text
    assert "1 training rows reach max_length=64 tokens" in caplog.text


def test_an_unknown_scheduler_is_rejected(tiny_model_dir: Path, tmp_path: Path, rows: list[ChatRow]) -> None:
    with pytest.raises(TrainingError, match=r"unknown training.lr_scheduler 'sawtooth'; known: .*cosine") as caught:
        _build(tiny_model_dir, tmp_path, rows, lr_scheduler="sawtooth")
    assert caught.value.reason == "invalid_training_config"


def test_4bit_without_bitsandbytes_names_the_extra(
    tiny_model_dir: Path, tmp_path: Path, rows: list[ChatRow], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail even where installed
    with pytest.raises(ImportError, match=rf"bitsandbytes.*`{re.escape(CUDA_EXTRA)}`"):
        _build(tiny_model_dir, tmp_path, rows, quantization="4bit")


@pytest.mark.parametrize(
    ("device", "quantization", "bf16", "expected"),
    [
        ("cuda", "auto", True, "qlora-nf4"),
        ("cuda:1", "4bit", True, "qlora-nf4"),
        ("cuda", "none", True, "bf16-lora"),
        ("cuda", "none", False, "fp16-lora"),
        ("cpu", "auto", False, "fp32-lora"),
        ("cpu", "none", False, "fp32-lora"),
        ("cpu", "4bit", False, "cpu-4bit-lora"),
    ],
)
def test_precision_follows_quantization_and_hardware(device: str, quantization: str, bf16: bool, expected: str) -> None:
    assert choose_precision(device, quantization, bf16_supported=bf16) == expected


def test_cpu_4bit_trains_and_loads(tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    result = train_adapter(
        tiny_model_dir,
        rows,
        tmp_path,
        lora=LoraSpec(),
        training=FAST.model_copy(update={"quantization": "4bit"}),
        device="cpu",
    )
    assert result.precision == "cpu-4bit-lora"
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)
    base = load_causal_lm(tiny_model_dir, "cpu")
    PeftModel.from_pretrained(base, tmp_path)


def test_cpu_4bit_gradients_survive_an_eval_forward(tiny_model_dir: Path, rows: list[ChatRow], tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    training = FAST.model_copy(update={"quantization": "4bit", "packing": False})
    lora = LoraSpec(dropout=0.0)  # every backward pass must see the same function
    trainer, _ = build_sft_trainer(tiny_model_dir, rows[:4], tmp_path, lora=lora, training=training, device="cpu")
    model = cast(torch.nn.Module, trainer.model)
    dataset = cast(datasets.Dataset, trainer.train_dataset)
    batch = trainer.data_collator([dataset[index] for index in range(4)])

    # The fp32 reference: the same model with every 4-bit Linear replaced by its dequantised weights, and the same
    # LoRA weights. Its gradients are what the 4-bit model's must be.
    reference = load_causal_lm(tiny_model_dir, "cpu", torch.float32)
    reference_modules = dict(reference.named_modules())
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for name, module in quantized.items():
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        target = reference_modules[name.removeprefix("base_model.model.").removesuffix(".base_layer")]
        target.weight.data = weight.to(torch.float32).reshape(target.weight.shape)
    peft_config = cast(LoraConfig, cast(PeftModel, model).peft_config["default"])
    reference_lora = get_peft_model(reference, LoraConfig(**{**cast(Any, peft_config).to_dict(), "lora_dropout": 0.0}))
    reference_params = dict(reference_lora.named_parameters())
    for name, param in model.named_parameters():
        if "lora_" in name:
            reference_params[name].data.copy_(param.data)

    def lora_b_grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        net.zero_grad()
        net.train()
        net(**batch, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if "lora_B" in n and p.grad is not None}

    expected = lora_b_grads(reference_lora)
    before = lora_b_grads(model)
    model.eval()
    with torch.no_grad():
        model(**batch, use_cache=False)  # what generate/evaluate do; on AVX512-BF16 CPUs it used to repack the weights
    after = lora_b_grads(model)
    assert expected and expected.keys() == before.keys() == after.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        # 4-bit matmuls on the CPU dequantise and multiply in fp32: the same function up to rounding.
        assert torch.allclose(before[name], grad, rtol=1e-3, atol=1e-6), name
        assert torch.allclose(after[name], grad, rtol=1e-3, atol=1e-6), name


@pytest.mark.slow
def test_smollm2_loss_decreases(smollm2_dir: Path, rows: list[ChatRow], tmp_path: Path) -> None:
    # Batch 4 with 2 accumulation steps puts all 8 rows in every optimizer step, so the logged losses are measured on
    # the same data and must fall, not just wander between batches.
    training = TrainingSpec(
        max_steps=4,
        batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        validation_fraction=0.0,
    )
    result = train_adapter(
        smollm2_dir,
        rows,
        tmp_path,
        lora=LoraSpec(),
        training=training,
        device="cpu",
    )
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert len(losses) == 4
    assert losses[-1] < losses[0], losses
    print(
        f"SmolLM2 LoRA: {result.seconds / result.steps:.2f} s per step of 8 rows, {result.tokens_per_second:.0f} tok/s"
    )
