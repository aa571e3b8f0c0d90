"""Serving throughput of `llamaduo serve`: continuous batching against the same server answering one request at a time.

The bundled SmolLM2-135M-Instruct is served by the real `llamaduo serve` app under uvicorn, in this process, on a
free loopback port. `--clients` concurrent clients (the official `openai` client) each send the same list of chat
requests (`max_tokens` 64, temperature 0.7, a seed per request) one after the other. The same loaded model is served
twice in the same run: with continuous batching (one scheduler thread, every client's rows in one batch) and one
request at a time (one `generate` call per request, as `llamaduo serve` did before batching). Both use the same
number of torch threads.

    make bench-infer        (or: .venv/bin/python -m tests.bench.serve_throughput)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported

import openai
import torch

from llamaduo.localmodel import LocalModelSettings, load_causal_lm, load_tokenizer, resolve_base_model
from llamaduo_inferencer.serve import ChatEngine, create_app
from tests.support.live_server import serve_in_thread

MODEL = "bundled:smollm2-135m-instruct"
SERVED_NAME = "smollm2"
SYSTEM = "You are a helpful assistant. Answer clearly and briefly."
PROMPTS = [
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a short, friendly email declining a meeting invitation for Friday afternoon.",
    "What are three practical tips for sleeping better?",
    "Explain the difference between a list and a tuple in Python.",
    "How do I say 'Where is the train station?' in French and in Spanish?",
    "Suggest a quick vegetarian dinner I can cook in twenty minutes.",
]


@dataclass(frozen=True)
class Run:
    """What one way of serving achieved."""

    label: str
    requests: int
    completion_tokens: int
    elapsed_s: float
    latencies_s: list[float]
    forward_passes: int | None

    @property
    def per_second(self) -> float:
        """Completed requests per second."""
        return self.requests / self.elapsed_s

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second."""
        return self.completion_tokens / self.elapsed_s


async def client_session(
    client: openai.AsyncOpenAI, index: int, max_tokens: int, temperature: float
) -> list[tuple[float, int]]:
    """One client: every prompt in turn, each awaited before the next; returns (latency, completion tokens) each."""
    results: list[tuple[float, int]] = []
    for number, prompt in enumerate(PROMPTS):
        started = time.perf_counter()
        reply = await client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=temperature,
            seed=1000 * index + number,
        )
        assert reply.usage is not None and reply.choices[0].message.content is not None
        results.append((time.perf_counter() - started, reply.usage.completion_tokens))
    return results


async def drive(base_url: str, clients: int, max_tokens: int, temperature: float) -> tuple[float, list[Any]]:
    """Warm the server up with one request, then run every client at once; return the elapsed time and results."""
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=600) as client:
        await client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        started = time.perf_counter()
        sessions = await asyncio.gather(
            *(client_session(client, index, max_tokens, temperature) for index in range(clients))
        )
        return time.perf_counter() - started, [item for session in sessions for item in session]


def measure(label: str, engine: ChatEngine, clients: int, max_tokens: int, temperature: float) -> Run:
    """Serve `engine` over HTTP for the duration of one workload and report it."""
    print(f"  {label}: {clients} clients x {len(PROMPTS)} requests ...", flush=True)
    with serve_in_thread(create_app(engine)) as base_url:  # leaving it closes the engine (app lifespan)
        before = engine.stats()
        elapsed, results = asyncio.run(drive(base_url, clients, max_tokens, temperature))
        after = engine.stats()
    passes = after.forward_passes - before.forward_passes if before is not None and after is not None else None
    run = Run(
        label=label,
        requests=len(results),
        completion_tokens=sum(tokens for _, tokens in results),
        elapsed_s=elapsed,
        latencies_s=[latency for latency, _ in results],
        forward_passes=passes,
    )
    print(f"    {run.requests} requests in {run.elapsed_s:.1f} s", flush=True)
    return run


def main(clients: int, max_tokens: int, temperature: float, threads: int, max_batch_size: int) -> None:
    torch.set_num_threads(threads)
    path = resolve_base_model(MODEL, LocalModelSettings().model_cache)
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(path, "cpu"), load_tokenizer(path)
    print(
        f"{MODEL} loaded in {time.perf_counter() - started:.1f} s; torch threads: {threads}; {clients} clients x "
        f"{len(PROMPTS)} requests, max_tokens {max_tokens}, temperature {temperature}"
    )
    batched = measure(
        f"continuous batching (max_batch_size={max_batch_size})",
        ChatEngine(model, tokenizer, base_name=SERVED_NAME, max_batch_size=max_batch_size),
        clients,
        max_tokens,
        temperature,
    )
    one_at_a_time = measure(
        "one request at a time (generate)",
        ChatEngine(model, tokenizer, base_name=SERVED_NAME, continuous_batching=False),
        clients,
        max_tokens,
        temperature,
    )
    print()
    print(f"{'mode':<42} {'requests':>8} {'seconds':>8} {'req/s':>7} {'tokens/s':>9} {'mean lat':>9} {'p95 lat':>8}")
    for run in (batched, one_at_a_time):
        p95 = statistics.quantiles(run.latencies_s, n=20)[-1]
        print(
            f"{run.label:<42} {run.requests:>8} {run.elapsed_s:>8.1f} {run.per_second:>7.2f} "
            f"{run.tokens_per_second:>9.1f} {statistics.mean(run.latencies_s):>8.2f}s {p95:>7.2f}s"
        )
    if batched.forward_passes:
        print(
            f"continuous batching: {batched.forward_passes} forward passes for {batched.completion_tokens} tokens "
            f"({batched.completion_tokens / batched.forward_passes:.1f} rows per pass on average)"
        )
    print(
        f"ratio batched/one-at-a-time: {batched.per_second / one_at_a_time.per_second:.2f}x requests/s, "
        f"{batched.tokens_per_second / one_at_a_time.tokens_per_second:.2f}x tokens/s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both runs (1 by default: on a shared 2-core machine OpenMP's waiting "
        "threads make 2-thread runs erratic)",
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()
    # One INFO line per request would drown the table.
    logging.getLogger("llamaduo_inferencer").setLevel(logging.WARNING)
    main(args.clients, args.max_tokens, args.temperature, args.threads, args.max_batch_size)
