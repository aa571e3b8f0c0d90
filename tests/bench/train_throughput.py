"""Fine-tuning throughput: our trainer path (`train_adapter`) against plain trl `SFTTrainer`, on the bundled
SmolLM2-135M and this machine's CPU, in the same run.

The reference is the plain recipe: trl's `SFTTrainer` with its defaults (padded batches, no packing, gradient
checkpointing, its fused LM head and per-step entropy/accuracy metrics), LoRA r=8/alpha 16 on q/k/v/o, batch 4 x 2
gradient accumulation, lr 2e-4 cosine with 10% warmup, one epoch, fp32. Ours is `train_adapter` with the same spec
and `training.packing` on: padding-free micro-batches whose rows attend only to themselves, the LM head run at answer
positions only, no checkpointing on a CPU. Both train on the same rows (chat rows whose lengths are log-normal around
~120 tokens, a short commit-message answer after a diff), in the same order, so they see the same real tokens and take
the same optimizer steps. Prints real (non-padding) tokens/s for both, the ratio (target: at least 1.5x) and the
validation loss of both adapters on the same held-out rows (answer tokens only).

    make bench-train        (or: .venv/bin/python -m tests.bench.train_throughput --rows 48)
    .venv/bin/python -m tests.bench.train_throughput --levers      (each lever of ours turned off in turn)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch
from peft import LoraConfig, PeftModel
from transformers import PreTrainedTokenizerBase, PrinterCallback
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data.rows import ChatRow
from llamaduo.localmodel import LocalModelSettings, load_causal_lm, load_tokenizer, resolve_base_model
from llamaduo_trainer.examples import chat_examples, datasets_progress_off, tokenize_examples
from llamaduo_trainer.finetune import build_sft_trainer, train_adapter
from llamaduo_trainer.sft import LlamaDuoSFTTrainer
from tests.bench.infer_throughput import DIFF_LINES, EXAMPLE

MODEL = "bundled:smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BODY_LINES = [
    "- read the retry count from settings",
    "- log the host and port before connecting",
    "- time out idle sockets instead of hanging",
    "- return early on empty input",
    "- cache lookups for five minutes",
]


@dataclass(frozen=True)
class Run:
    """What one way of training achieved."""

    real_tokens: int
    seconds: float
    steps: int
    validation_loss: float

    @property
    def per_second(self) -> float:
        """Real (non-padding) tokens per second."""
        return self.real_tokens / self.seconds


def make_rows(count: int, tokenizer: PreTrainedTokenizerBase, *, median: int = 120, seed: int = 0) -> list[ChatRow]:
    """Commit-message rows whose rendered lengths are log-normal around `median` tokens (prompt: a diff)."""
    rng = random.Random(seed)
    pairs = [json.loads(line)["messages"] for line in EXAMPLE.read_text().splitlines() if line.strip()]
    rows: list[ChatRow] = []
    for _ in range(count):
        target = max(48, min(480, int(rng.lognormvariate(math.log(median), 0.5))))
        ask, answer = rng.choice(pairs)
        body = "\n".join(rng.sample(BODY_LINES, rng.randrange(0, 3)))
        reply = f"{answer['content']}\n\n{body}" if body else answer["content"]
        lines: list[str] = []
        while True:
            content = f"{ask['content']}\n\n```diff\n" + "\n".join(lines) + "\n```"
            messages = [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
            ids: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
            if len(ids["input_ids"]) >= target:
                break
            lines.append(rng.choice(DIFF_LINES))
        rows.append(ChatRow.model_validate({"messages": messages}))
    return rows


def real_tokens(rows: Sequence[ChatRow], tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[int, int]:
    """(all tokens, answer tokens) of the rows as trained on: rendered, answer-labelled, cut at max_length."""
    tokenized = tokenize_examples(chat_examples(rows), tokenizer, max_length)
    return tokenized.tokens, tokenized.answer_tokens


def spec(args: argparse.Namespace, **changes: Any) -> TrainingSpec:
    """The shared recipe as our spec (no validation split inside the run: both ways are validated afterwards)."""
    base = TrainingSpec(
        epochs=1.0,
        learning_rate=2e-4,
        batch_size=4,
        gradient_accumulation_steps=2,
        max_length=512,
        warmup_ratio=0.1,
        lr_scheduler="cosine",
        seed=0,
        validation_fraction=0.0,
        checkpoint_steps=0,
        packing=True,
    )
    return base.model_copy(update=changes)


def plain(path: Path, rows: Sequence[ChatRow], args: argparse.Namespace, out_dir: Path) -> tuple[float, int]:
    """trl's SFTTrainer, plain: conversational prompt-completion rows, its defaults, fp32 on the CPU."""
    training = spec(args)
    config = SFTConfig(
        output_dir=str(out_dir / "scratch"),
        num_train_epochs=training.epochs,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,
        max_length=training.max_length,
        seed=training.seed,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    with datasets_progress_off():
        trainer = SFTTrainer(
            model=load_causal_lm(path, "cpu", torch.float32),
            args=config,
            train_dataset=datasets.Dataset.from_list(chat_examples(rows)),
            processing_class=load_tokenizer(path),
            peft_config=lora,
        )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    cast(PeftModel, trainer.model).save_pretrained(str(out_dir))
    return seconds, trainer.state.global_step


def ours(path: Path, rows: Sequence[ChatRow], args: argparse.Namespace, out_dir: Path) -> tuple[float, int]:
    """`train_adapter`, as the trainer service runs it."""
    lora = LoraSpec(r=8, alpha=16, dropout=0.05, target_modules=TARGETS)
    result = train_adapter(path, rows, out_dir, lora=lora, training=spec(args), device="cpu")
    return result.seconds, result.steps


def validation_loss(
    path: Path, adapter: Path | None, rows: Sequence[ChatRow], tokenizer: PreTrainedTokenizerBase
) -> float:
    """Mean next-token loss over the answer tokens of `rows` (base + adapter, or the base alone)."""
    model: Any = load_causal_lm(path, "cpu", torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    dataset = tokenize_examples(chat_examples(rows), tokenizer, 512, split="validation").dataset
    total, count = 0.0, 0
    with torch.inference_mode():
        for example in dataset:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            targets = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


def lever_runs(path: Path, rows: Sequence[ChatRow], args: argparse.Namespace, tokens: int) -> None:
    """Ours with one lever at a time turned off (and the plain reference), on the same rows: real tokens/s each."""
    lora = LoraSpec(r=8, alpha=16, dropout=0.05, target_modules=TARGETS)

    def timed(label: str, training: TrainingSpec, tweak: Callable[[LlamaDuoSFTTrainer], None] | None = None) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            trainer, _ = build_sft_trainer(path, rows, Path(scratch), lora=lora, training=training, device="cpu")
            ours_trainer = cast(LlamaDuoSFTTrainer, trainer)
            if tweak is not None:
                tweak(ours_trainer)
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
        print(f"  {label:<58} {seconds:>7.1f} s {tokens / seconds:>8.1f} real tokens/s", flush=True)

    def stock_sdpa(trainer: LlamaDuoSFTTrainer) -> None:
        cast(Any, trainer.model).get_base_model().set_attn_implementation("sdpa")

    def trl_head(trainer: LlamaDuoSFTTrainer) -> None:
        trainer.answer_logits_only = False

    with tempfile.TemporaryDirectory() as scratch:
        seconds, _ = plain(path, rows, args, Path(scratch))
    print(f"  {'plain trl SFTTrainer':<58} {seconds:>7.1f} s {tokens / seconds:>8.1f} real tokens/s", flush=True)
    timed("ours (all levers)", spec(args))
    timed("ours - padding-free (padded batches, answer-only head)", spec(args, packing=False))
    timed("ours - varlen attention (padding-free, stock sdpa mask)", spec(args), stock_sdpa)
    timed("ours - answer-only LM head (trl's fused head, all positions)", spec(args), trl_head)
    timed("ours + gradient checkpointing", spec(args, gradient_checkpointing=True))

    def padding_free_only(trainer: LlamaDuoSFTTrainer) -> None:
        trl_head(trainer)
        stock_sdpa(trainer)

    timed("padding-free only (trl's head, stock sdpa)", spec(args), padding_free_only)


def main(argv: Sequence[str] | None = None) -> None:
    """Train both ways on the same rows; print real tokens/s, the ratio and both validation losses."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96, help="training rows (one epoch)")
    parser.add_argument("--validation-rows", type=int, default=32, help="held-out rows for the validation loss")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levers", action="store_true", help="time ours with each lever off instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = cast(Path, resolve_base_model(MODEL, LocalModelSettings().model_cache))
    tokenizer = load_tokenizer(path)
    rows = make_rows(args.rows + args.validation_rows, tokenizer)
    train_rows, held_out = rows[: args.rows], rows[args.rows :]
    tokens, answer = real_tokens(train_rows, tokenizer, 512)
    lengths = sorted(
        len(
            cast(Any, tokenizer.apply_chat_template(r.model_dump()["messages"], tokenize=True, return_dict=True))[
                "input_ids"
            ]
        )
        for r in train_rows
    )
    print(
        f"SmolLM2-135M, {len(train_rows)} training rows ({lengths[0]}-{lengths[-1]} tokens, median "
        f"{lengths[len(lengths) // 2]}; {tokens} real tokens, {answer / tokens:.0%} of them answer), "
        f"{len(held_out)} held-out rows, batch 4 x 2, {args.threads} threads",
        flush=True,
    )
    if args.levers:
        lever_runs(path, train_rows, args, tokens)
        return
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        for label, way in (
            ("plain: trl SFTTrainer, padded batches", plain),
            ("ours: train_adapter, padding-free", ours),
        ):
            out_dir = Path(scratch) / label.split(":")[0]
            seconds, steps = way(path, train_rows, args, out_dir)
            runs[label] = Run(tokens, seconds, steps, validation_loss(path, out_dir, held_out, tokenizer))
        base_loss = validation_loss(path, None, held_out, tokenizer)
    print(f"{'way':<40} {'steps':>5} {'seconds':>8} {'real tokens/s':>14} {'validation loss':>16}")
    for label, run in runs.items():
        print(f"{label:<40} {run.steps:>5} {run.seconds:>8.1f} {run.per_second:>14.1f} {run.validation_loss:>16.4f}")
    print(f"{'base model, no adapter':<40} {'':>5} {'':>8} {'':>14} {base_loss:>16.4f}")
    reference, fast = runs.values()
    print(
        f"ratio (ours / plain real tokens per second): {fast.per_second / reference.per_second:.2f}x "
        "(target >= 1.5x); "
        f"validation loss ours {fast.validation_loss:.4f} vs plain {reference.validation_loss:.4f}, "
        f"difference {fast.validation_loss - reference.validation_loss:+.4f} ({_verdict(fast, reference)})"
    )


def _verdict(fast: Run, reference: Run) -> str:
    """Lower, equal within LoRA-dropout noise (masks fall differently on padded and padding-free batches), or higher."""
    difference = fast.validation_loss - reference.validation_loss
    if difference < 0:
        return "lower"
    if difference <= 1e-3:
        return "equal within dropout noise"
    return "HIGHER"


if __name__ == "__main__":
    main()
