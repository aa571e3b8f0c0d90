"""Evaluation-time generation: our continuous batching (`answer_chats`) against the reference way, on the bundled
SmolLM2-135M and this machine's CPU, in the same run.

The reference way is transformers `generate` on fixed batches of 8 prompts in input order (no length sorting),
`num_return_sequences=k`: each batch pads every prompt to its longest, prefills every sample separately and decodes
until its longest answer ends. Ours sorts prompts by length, prefills each prompt once for its k samples, and lets a
finished row leave the batch at once so a waiting one takes its place. Same prompts (lengths log-normal around
~100 tokens), same sampling (the spec's defaults: k=4, temperature 0.7, top-p 0.9, 128 new tokens), same number of
sequences decoded together (32). Throughput counts generated tokens up to and including eos, never padding.

    make bench-infer        (or: .venv/bin/python -m tests.bench.infer_throughput --prompts 16)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamaduo.localmodel import LocalModelSettings, load_causal_lm, load_tokenizer, resolve_base_model
from llamaduo_inferencer.batching import answer_chats
from llamaduo_inferencer.generation import Message, encode_chats, eos_token_ids

MODEL = "bundled:smollm2-135m-instruct"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "coverage.jsonl"
DIFF_LINES = [
    "-    retries = 3",
    "+    retries = settings.max_retries",
    "     def connect(self, host: str, port: int) -> None:",
    "+        log.info('connecting to %s:%d', host, port)",
    "-        self.sock = socket.create_connection((host, port))",
    "+        self.sock = socket.create_connection((host, port), timeout=self.timeout)",
    "@@ -41,7 +41,9 @@ class Client:",
    "+    cache_ttl_s: float = 300.0",
    "-# TODO: handle the empty case",
    "+    if not rows:\n+        return []",
]


@dataclass(frozen=True)
class Run:
    """What one way of generating achieved."""

    generated_tokens: int
    elapsed_s: float

    @property
    def per_second(self) -> float:
        """Generated tokens per second."""
        return self.generated_tokens / self.elapsed_s


def make_prompts(count: int, seed: int = 0) -> list[list[Message]]:
    """Commit-message requests whose diffs make the prompt lengths log-normal around ~100 tokens (16 to 600)."""
    rng = random.Random(seed)
    asks = [json.loads(line)["messages"][0]["content"] for line in EXAMPLE.read_text().splitlines() if line.strip()]
    prompts: list[list[Message]] = []
    for _ in range(count):
        lines = max(0, min(60, int(rng.lognormvariate(math.log(6), 0.9))))
        diff = "\n".join(rng.choice(DIFF_LINES) for _ in range(lines))
        ask = rng.choice(asks)
        content = f"{ask}\n\n```diff\n{diff}\n```" if diff else ask
        prompts.append([{"role": "user", "content": content}])
    return prompts


def reference(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[Message]], *, k: int, max_new_tokens: int, seed: int
) -> Run:
    """transformers `generate` on fixed batches of 8 prompts in input order, k return sequences each."""
    encoded = encode_chats(tokenizer, prompts)
    eos = set(eos_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id
    generated = 0
    torch.manual_seed(seed)
    started = time.perf_counter()
    for start in range(0, len(encoded), 8):
        batch = encoded[start : start + 8]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=0.7,
                top_p=0.9,
                num_return_sequences=k,
                pad_token_id=pad,
            )
        for row in output[:, width:].tolist():
            length = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            generated += length
    return Run(generated, time.perf_counter() - started)


def ours(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[Message]], *, k: int, max_new_tokens: int, seed: int
) -> Run:
    """`answer_chats`, as the inferencer runs it, with 32 sequences decoded together."""
    started = time.perf_counter()
    results = answer_chats(
        model,
        tokenizer,
        prompts,
        n=k,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=8 * k,
    )
    elapsed = time.perf_counter() - started
    return Run(sum(c.completion_tokens for completions in results for c in completions), elapsed)


def main(argv: Sequence[str] | None = None) -> None:
    """Run both ways on the same prompts and print tokens/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_base_model(MODEL, LocalModelSettings().model_cache)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, "cpu")
    prompts = make_prompts(args.prompts)
    lengths = sorted(len(ids) for ids in encode_chats(tokenizer, prompts))
    print(
        f"{len(prompts)} prompts, {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
        f"k={args.k}, {args.max_new_tokens} new tokens max, {args.threads} threads"
    )
    # A short warm-up so neither way pays first-call costs.
    answer_chats(model, tokenizer, prompts[:2], n=1, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0, batch_size=2)
    ways: list[tuple[str, Callable[..., Run]]] = [("reference: generate, 8 prompts a batch", reference)]
    ways.append(("ours: continuous batching", ours))
    runs = {
        name: way(model, tokenizer, prompts, k=args.k, max_new_tokens=args.max_new_tokens, seed=1) for name, way in ways
    }
    print(f"{'way':<40} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for name, run in runs.items():
        print(f"{name:<40} {run.generated_tokens:>8} {run.elapsed_s:>8.1f} {run.per_second:>9.1f}")
    base, fast = runs[ways[0][0]], runs[ways[1][0]]
    print(f"ratio (ours / reference tokens per second): {fast.per_second / base.per_second:.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
