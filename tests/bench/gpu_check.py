"""`make gpu-check`: our generation path against the reference way on a CUDA GPU, with no download.

Inference half: a randomly initialised TinyLlama-1.1B-shaped Llama in bf16 answers 256 prompts (lengths log-normal
around ~200 tokens) with 128 new tokens each. The reference way is transformers `generate` on fixed batches of 8
in input order; ours is the inferencer's continuous batcher with every prompt admitted as room allows (length
sorted, one prefill per prompt, 256 rows decoding together). Random weights rarely say eos, so eos is switched off
and every row generates exactly 128 tokens in both ways: the comparison is pure decoding throughput. Prints new
tokens/s for both, the ratio (target: at least 20x) and peak GPU memory.

    make gpu-check                                  (on a machine with a CUDA GPU)
    python -m tests.bench.gpu_check --smoke         (a tiny config on the CPU: checks the script itself runs)
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and run the check."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, to check the script runs")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="rows our batcher decodes together")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.new_tokens, args.batch = min(args.prompts, 24), min(args.new_tokens, 16), min(args.batch, 16)
    inference_half(args)


if __name__ == "__main__":
    main()
