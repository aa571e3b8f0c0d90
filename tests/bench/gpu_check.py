"""`make gpu-check`: our generation and training paths against the reference ways on a CUDA GPU, with no download.

Inference half: a randomly initialised TinyLlama-1.1B-shaped Llama in bf16 answers 256 prompts (lengths log-normal
around ~200 tokens) with 128 new tokens each. The reference way is transformers `generate` on fixed batches of 8
in input order; ours is the inferencer's continuous batcher with every prompt admitted as room allows (length
sorted, one prefill per prompt, 256 rows decoding together). Random weights rarely say eos, so eos is switched off
and every row generates exactly 128 tokens in both ways: the comparison is pure decoding throughput. Prints new
tokens/s for both, the ratio (target: at least 20x) and peak GPU memory.

Training half: the same TinyLlama-1.1B shape, randomly initialised and saved with a word-level tokenizer over its
32000 ids (so our path runs whole: chat template, answer-only labels), fine-tuned on 512 chat rows whose lengths are
log-normal around ~250 tokens, one epoch, LoRA r=16 on all linear layers, batch 4 x 2, gradient checkpointing, QLoRA
(NF4, double quantisation, bf16 compute) both ways. The reference is plain trl `SFTTrainer` (padded batches); ours is
`train_adapter` (padding-free batches with per-row attention). Prints real (non-padding) tokens/s, peak GPU memory,
the ratio (target: at least 10x) and MFU = 6 x parameters x tokens/s / the GPU's dense bf16 peak.

    make gpu-check                                  (on a machine with a CUDA GPU: both halves)
    python -m tests.bench.gpu_check --half training (one half only)
    python -m tests.bench.gpu_check --smoke         (a tiny config on the CPU: checks the script itself runs)
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data.rows import ChatRow
from llamaduo.localmodel.loading import CHATML_TEMPLATE
from llamaduo_inferencer.batching import ContinuousBatcher, RowRequest

TINYLLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
SMOKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}


class TokenIds:
    """The tokenizer surface the batcher needs, for prompts that are token ids already: no eos, pad 0."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        """Token ids as text (only used for stop strings and the returned text)."""
        return " ".join(str(token) for token in tokens)


@dataclass(frozen=True)
class Run:
    """One way's result."""

    new_tokens: int
    elapsed_s: float
    peak_gib: float

    @property
    def per_second(self) -> float:
        """New tokens per second."""
        return self.new_tokens / self.elapsed_s


def build_model(shape: dict[str, int], device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A randomly initialised Llama of `shape`, on `device`, in eval mode, eos switched off."""
    torch.manual_seed(0)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(count: int, vocab: int, median: int, longest: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts with log-normal lengths."""
    rng = random.Random(seed)
    lengths = [max(8, min(longest, int(rng.lognormvariate(math.log(median), 0.6)))) for _ in range(count)]
    return [[rng.randrange(2, vocab) for _ in range(length)] for length in lengths]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def reference(model: Any, prompts: list[list[int]], new_tokens: int, device: str) -> Run:
    """`generate` on fixed batches of 8 prompts in input order, greedy, exactly `new_tokens` each."""
    _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    produced = 0
    for start in range(0, len(prompts), 8):
        batch = prompts[start : start + 8]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        produced += (output.shape[1] - width) * len(batch)
    _sync(device)
    return Run(produced, time.perf_counter() - started, _peak_gib(device))


def ours(model: Any, prompts: list[list[int]], new_tokens: int, device: str, batch: int) -> Run:
    """The inferencer's continuous batcher, `batch` rows decoding together."""
    _reset_peak(device)
    batcher = ContinuousBatcher(model, TokenIds(), max_batch_size=batch, max_prefill_tokens=32768)  # type: ignore[arg-type]
    _sync(device)
    started = time.perf_counter()
    results = batcher.run([RowRequest(prompt, new_tokens) for prompt in prompts])
    _sync(device)
    return Run(sum(c.completion_tokens for c in results), time.perf_counter() - started, _peak_gib(device))


def inference_half(args: argparse.Namespace) -> float:
    """Run both ways; print the table and return the ratio."""
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU (torch sees none); use --smoke to exercise the script on a CPU")
    dtype = torch.float32 if smoke else torch.bfloat16
    model = build_model(SMOKE if smoke else TINYLLAMA, device, dtype)
    prompts = make_prompts(
        args.prompts, model.config.vocab_size, median=20 if smoke else 200, longest=64 if smoke else 1024
    )
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    print(
        f"inference: {name}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {dtype}, "
        f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
        f"{args.new_tokens} new tokens each"
    )
    # Warm-up: kernels, allocator and cuBLAS handles for both ways.
    reference(model, prompts[:8], 4, device)
    ours(model, prompts[:8], 4, device, args.batch)
    runs = {
        "reference: generate, 8 prompts a batch": reference(model, prompts, args.new_tokens, device),
        f"ours: continuous batching, {args.batch} rows": ours(model, prompts, args.new_tokens, device, args.batch),
    }
    print(f"{'way':<44} {'tokens':>8} {'seconds':>8} {'tokens/s':>10} {'peak GiB':>9}")
    for label, run in runs.items():
        print(f"{label:<44} {run.new_tokens:>8} {run.elapsed_s:>8.1f} {run.per_second:>10.0f} {run.peak_gib:>9.2f}")
    base, fast = runs.values()
    ratio = fast.per_second / base.per_second
    print(f"inference ratio (ours / reference): {ratio:.1f}x  (target >= 20x)")
    return ratio


# Dense bf16 tensor-core peaks (no sparsity), TFLOPS, by a substring of torch.cuda.get_device_name(); first match wins.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
TRAIN_SPECIALS = ("<pad>", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system")


def bf16_peak_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak by its name, None when unknown."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab_size` ids: ChatML's markers and roles, then words `t<id>` for every id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(TRAIN_SPECIALS)}
    vocab.update({f"t{index}": index for index in range(len(TRAIN_SPECIALS), vocab_size)})
    backend = cast(Any, Tokenizer)(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = cast(Any, PreTrainedTokenizerFast)(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return cast(PreTrainedTokenizerFast, tokenizer)


def save_random_model(shape: dict[str, int], device: str, dtype: torch.dtype, directory: Path) -> int:
    """Save a randomly initialised Llama of `shape` with a word tokenizer to `directory`; return its parameters."""
    model = build_model(shape, device, dtype)
    model.config.eos_token_id = 3
    model.generation_config.eos_token_id = 3
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    word_tokenizer(shape["vocab_size"]).save_pretrained(directory)
    del model
    _free(device)
    return parameters


def training_rows(count: int, vocab: int, median: int, longest: int, seed: int = 0) -> list[ChatRow]:
    """Chat rows of random words whose rendered lengths are log-normal around `median` tokens, ~1/5 of them answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = max(12, min(longest, int(rng.lognormvariate(math.log(median), 0.6))))
        answer = max(2, length // 5)
        words = [f"t{rng.randrange(len(TRAIN_SPECIALS), vocab)}" for _ in range(length - 8)]
        prompt, reply = " ".join(words[: len(words) - answer]), " ".join(words[len(words) - answer :])
        rows.append(
            ChatRow.model_validate(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
            )
        )
    return rows


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class TrainRun:
    """One way's training result."""

    real_tokens: int
    elapsed_s: float
    peak_gib: float

    @property
    def per_second(self) -> float:
        """Real (non-padding) tokens per second."""
        return self.real_tokens / self.elapsed_s


def train_spec(smoke: bool) -> TrainingSpec:
    """The recipe both ways share: one epoch, batch 4 x 2, lr 2e-4 cosine, checkpointing, QLoRA on a GPU."""
    return TrainingSpec(
        epochs=1.0,
        learning_rate=2e-4,
        batch_size=4,
        gradient_accumulation_steps=2,
        max_length=1024,
        warmup_ratio=0.1,
        lr_scheduler="cosine",
        quantization="none" if smoke else "4bit",
        validation_fraction=0.0,
        checkpoint_steps=0,
        gradient_checkpointing=True,
        packing=True,
    )


def plain_training(model_dir: Path, rows: Sequence[ChatRow], device: str, smoke: bool) -> TrainRun:
    """trl's SFTTrainer with the paper's QLoRA recipe: padded batches, no packing."""
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    from llamaduo.localmodel import load_tokenizer, nf4_config
    from llamaduo_trainer.examples import chat_examples, datasets_progress_off

    spec = train_spec(smoke)
    dtype = torch.float32 if smoke else torch.bfloat16
    extra: dict[str, Any] = {} if smoke else {"quantization_config": nf4_config(torch.bfloat16)}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map={"": device}, local_files_only=True, **extra
    )
    if not smoke:
        model = cast(Any, prepare_model_for_kbit_training)(model, use_gradient_checkpointing=True)
    config = SFTConfig(
        output_dir=str(model_dir / "plain-scratch"),
        num_train_epochs=spec.epochs,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,
        max_length=spec.max_length,
        gradient_checkpointing=True,
        bf16=not smoke,
        use_cpu=smoke,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    with datasets_progress_off():
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(chat_examples(rows)),
            processing_class=load_tokenizer(model_dir),
            peft_config=lora,
        )
    trainer.remove_callback(PrinterCallback)
    _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    trainer.train()
    _sync(device)
    elapsed = time.perf_counter() - started
    peak = _peak_gib(device)
    del trainer, model
    _free(device)
    return TrainRun(0, elapsed, peak)


def our_training(model_dir: Path, rows: Sequence[ChatRow], device: str, smoke: bool) -> TrainRun:
    """`train_adapter`, as the trainer service runs it (QLoRA on a GPU)."""
    from llamaduo_trainer.finetune import train_adapter

    lora = LoraSpec(r=16, alpha=32, dropout=0.05, target_modules=["all-linear"])
    with tempfile.TemporaryDirectory() as out_dir:
        result = train_adapter(model_dir, rows, Path(out_dir), lora=lora, training=train_spec(smoke), device=device)
    _free(device)
    return TrainRun(result.tokens, result.seconds, result.peak_memory_bytes / 2**30 if device != "cpu" else 0.0)


def training_half(args: argparse.Namespace) -> float:
    """Fine-tune both ways on the same rows; print the table and return the ratio."""
    from llamaduo_trainer.examples import chat_examples, tokenize_examples

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU (torch sees none); use --smoke to exercise the script on a CPU")
    shape = SMOKE if smoke else TINYLLAMA
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as scratch:
        model_dir = Path(scratch) / "model"
        parameters = save_random_model(shape, device, torch.float32 if smoke else torch.bfloat16, model_dir)
        rows = training_rows(
            args.train_rows, shape["vocab_size"], median=24 if smoke else 250, longest=64 if smoke else 1024
        )
        tokenizer = word_tokenizer(shape["vocab_size"])
        tokenized = tokenize_examples(chat_examples(rows), tokenizer, train_spec(smoke).max_length)
        print(
            f"training: {name}, {parameters / 1e9:.2f}B parameters, "
            f"{'fp32 LoRA' if smoke else 'QLoRA NF4 + bf16'}, r=16 all linear, {len(rows)} rows "
            f"({tokenized.tokens} real tokens, {tokenized.answer_tokens / tokenized.tokens:.0%} answer), "
            "batch 4 x 2, gradient checkpointing, one epoch"
        )
        plain = plain_training(model_dir, rows, device, smoke)
        runs = {
            "reference: trl SFTTrainer, padded": TrainRun(tokenized.tokens, plain.elapsed_s, plain.peak_gib),
            "ours: train_adapter, padding-free": our_training(model_dir, rows, device, smoke),
        }
    peak = bf16_peak_tflops(name) if device == "cuda" else None
    print(f"{'way':<44} {'tokens':>8} {'seconds':>8} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>7}")
    for label, run in runs.items():
        mfu = f"{6 * parameters * run.per_second / (peak * 1e12):.1%}" if peak else "n/a"
        print(
            f"{label:<44} {run.real_tokens:>8} {run.elapsed_s:>8.1f} {run.per_second:>10.0f} "
            f"{run.peak_gib:>9.2f} {mfu:>7}"
        )
    if device == "cuda" and peak is None:
        print(f"MFU: the bf16 peak of {name!r} is unknown (known: {', '.join(k for k, _ in BF16_PEAK_TFLOPS)})")
    base, fast = runs.values()
    ratio = fast.per_second / base.per_second
    print(f"training ratio (ours / reference): {ratio:.1f}x  (target >= 10x)")
    return ratio


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and run the check."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, to check the script runs")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="rows our batcher decodes together")
    parser.add_argument("--train-rows", type=int, default=512, help="chat rows each way trains on (one epoch)")
    parser.add_argument("--half", choices=("both", "inference", "training"), default="both")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.new_tokens, args.batch = min(args.prompts, 24), min(args.new_tokens, 16), min(args.batch, 16)
        args.train_rows = min(args.train_rows, 16)
    if args.half in ("both", "inference"):
        inference_half(args)
    if args.half in ("both", "training"):
        training_half(args)


if __name__ == "__main__":
    main()
