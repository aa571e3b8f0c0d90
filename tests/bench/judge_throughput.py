"""Judge throughput against a rate-limited service LLM: our client (requests-per-minute limiter, shared Retry-After
pause, cache, price table) running `judge_responses`, against the reference way (fixed batches awaited in lock-step
with asyncio.gather, the raw openai SDK with its default retries, no limiter). Each runs on a fresh scripted server
with 200 ms latency and a 600 requests/minute sliding window. Then our evaluation runs again on the same store: a
re-run must make no HTTP call and spend no new dollar.

    make bench-judge        (or: .venv/bin/python -m tests.bench.judge_throughput --judgments 200)
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from llamaduo.contract.events import Spend
from llamaduo.contract.spec import EvaluationSpec, TaskSpec
from llamaduo.data.results import PromptResponses, Response
from llamaduo.data.rows import ChatRow, make_row
from llamaduo.llm import ServiceLLM, ServiceLLMSettings, resolve
from llamaduo.store import LocalStore
from llamaduo_judge.judging import judge_responses
from llamaduo_judge.prompts import JUDGMENT_SCHEMA, SCHEMA_NAME, judge_messages
from tests.support.scripted_llm import ScriptedLLM

MODEL = "scripted-judge"
PRICE = (2.5, 10.0)  # USD per 1M input/output tokens, given through the price table like any model's
TASK = TaskSpec(name="capital cities", description="Name the capital of the country asked about.")
RESPONSES_PER_ROW = 4
SCOPE = "bench-judge"


@dataclass(frozen=True)
class Run:
    """What one way of judging achieved."""

    judged: int
    failed: int
    elapsed_s: float
    rate_limited: int
    http_requests: int
    spend: Spend | None = None

    @property
    def per_second(self) -> float:
        """Successful judgments per second."""
        return self.judged / self.elapsed_s


def workload(judgments: int) -> tuple[list[ChatRow], list[PromptResponses]]:
    """`judgments` distinct (test row, response) pairs, four responses per row."""
    rows: list[ChatRow] = []
    responses: list[PromptResponses] = []
    for index in range(math.ceil(judgments / RESPONSES_PER_ROW)):
        row = make_row(
            f"What is the capital of country number {index}?",
            f"The capital of country number {index} is City {index}.",
            origin="coverage",
        )
        count = min(RESPONSES_PER_ROW, judgments - index * RESPONSES_PER_ROW)
        rows.append(row)
        responses.append(
            PromptResponses(
                index=index,
                prompt=row.prompt,
                responses=[
                    Response(
                        text=f"Answer {n}: it is City {index}.",
                        prompt_tokens=12,
                        completion_tokens=8,
                        finish_reason="stop",
                        latency_s=0.1,
                    )
                    for n in range(count)
                ],
            )
        )
    return rows, responses


def client_for(server: ScriptedLLM, store: LocalStore, rpm: int) -> ServiceLLM:
    """Our client as a judge service would build it: settings from the environment's fields, then `resolve`."""
    settings = ServiceLLMSettings(
        base_url=server.base_url, model=MODEL, requests_per_minute=rpm, prices={MODEL: PRICE}, api_key=None
    )
    return ServiceLLM(resolve(settings), store)


def progress(label: str, every: int) -> Callable[[int, int], None]:
    """A progress callback printing a line every `every` judgments."""
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            rate = done / max(1e-9, time.perf_counter() - started)
            print(f"  {label}: {done}/{total} judged, {rate:.1f}/s", flush=True)

    return report


async def ours(
    server: ScriptedLLM, store: LocalStore, rows: list[ChatRow], responses: list[PromptResponses], rpm: int, label: str
) -> Run:
    """Our evaluation: `judge_responses` through `ServiceLLM` with the limiter, all judgments submitted at once."""
    before_requests, before_429 = len(server.requests), server.rate_limited
    # Called with keywords only; the judge's third parameter has been renamed before (llm -> judges).
    judge_param = next(
        name for name in ("judges", "llm", "judge") if name in inspect.signature(judge_responses).parameters
    )
    async with client_for(server, store, rpm) as llm:
        started = time.perf_counter()
        outcome = await judge_responses(
            test_rows=rows,
            responses=responses,
            **{judge_param: llm},
            evaluation=EvaluationSpec(repeats=1),
            task=TASK,
            cache_scope=SCOPE,
            on_progress=progress(label, 250),
        )
        elapsed = time.perf_counter() - started
    return Run(
        judged=len(outcome.judgments) - outcome.failed,
        failed=outcome.failed,
        elapsed_s=elapsed,
        rate_limited=server.rate_limited - before_429,
        http_requests=len(server.requests) - before_requests,
        spend=outcome.spend,
    )


async def reference(server: ScriptedLLM, rows: list[ChatRow], responses: list[PromptResponses], batch: int) -> Run:
    """The reference way: batches of `batch` awaited in lock-step, raw SDK (default: 2 retries), no limiter."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="bench")
    jobs = [judge_messages(TASK, rows[item.index], response.text) for item in responses for response in item.responses]
    response_format = {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": JUDGMENT_SCHEMA}}

    async def judge(messages: list[dict[str, str]]) -> bool:
        try:
            request: dict[str, Any] = {
                "model": MODEL,
                "messages": messages,
                "response_format": response_format,
                "temperature": 0.2,
                "max_tokens": 512,
            }
            result = await client.chat.completions.create(**request)
            json.loads(result.choices[0].message.content or "")
        except (openai.APIError, ValueError):
            return False  # the reference has no further retry: the judgment is lost
        return True

    report = progress("reference", batch * 8)
    done: list[bool] = []
    started = time.perf_counter()
    for start in range(0, len(jobs), batch):
        done += await asyncio.gather(*(judge(m) for m in jobs[start : start + batch]))
        report(len(done), len(jobs))
    elapsed = time.perf_counter() - started
    await client.close()
    return Run(
        judged=sum(done),
        failed=len(done) - sum(done),
        elapsed_s=elapsed,
        rate_limited=server.rate_limited,
        http_requests=len(server.requests),
    )


async def main(judgments: int, latency: float, rpm: int, batch: int, window: float) -> None:
    rows, responses = workload(judgments)
    limit = rpm / 60.0
    # The same rate, enforced over a shorter window when asked: providers say they may enforce a per-minute limit
    # over slices of the minute, which takes away the full minute's burst that a 60 s window allows.
    per_window = max(1, round(rpm * window / 60.0))
    print(
        f"{judgments} judgments; scripted server: {latency * 1000:.0f} ms latency, "
        f"{per_window} requests per {window:g} s sliding window ({rpm}/min)"
    )

    def server() -> ScriptedLLM:
        return ScriptedLLM(judge_score=80, latency_s=latency, rpm_limit=per_window, rate_window_s=window, model=MODEL)

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        with server() as scripted:
            first = await ours(scripted, store, rows, responses, rpm, "ours")
        with server() as scripted:
            base = await reference(scripted, rows, responses, batch)
        with server() as scripted:
            again = await ours(scripted, store, rows, responses, rpm, "ours, re-run")
    assert first.spend is not None and again.spend is not None
    print()
    print(
        f"ours (judge_responses, ServiceLLM requests_per_minute={rpm}): {first.per_second:6.2f} judgments/s "
        f"= {first.per_second / limit:.2f} of the server's limit ({limit:.0f}/s); {first.judged} judged, "
        f"{first.failed} failed, {first.rate_limited} 429s, {first.http_requests} HTTP calls, {first.elapsed_s:.1f} s"
    )
    print(
        f"reference (batches of {batch} in lock-step, raw openai SDK, no limiter): {base.per_second:6.2f} judgments/s "
        f"= {base.per_second / limit:.2f} of the limit; {base.judged} judged, {base.failed} lost, "
        f"{base.rate_limited} 429s, {base.http_requests} HTTP calls, {base.elapsed_s:.1f} s"
    )
    print(f"ratio ours/reference: {first.per_second / base.per_second:.2f}")
    print(
        f"first run spend: ${first.spend.usd:.4f} over {first.spend.calls} calls "
        f"(${first.spend.usd - first.spend.cached_usd:.4f} new)"
    )
    new_usd = again.spend.usd - again.spend.cached_usd
    print(
        f"re-run on the same store: {again.http_requests} HTTP calls, {again.spend.cached_calls}/{again.spend.calls} "
        f"calls from the cache, ${new_usd:.4f} new spend (usd ${again.spend.usd:.4f}, cached_usd "
        f"${again.spend.cached_usd:.4f}), {again.elapsed_s:.1f} s"
    )
    if again.http_requests != 0 or new_usd != 0:
        raise SystemExit("the re-run was not free")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judgments", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2, help="scripted server latency, seconds")
    parser.add_argument("--rpm", type=int, default=600, help="the server's limit, and our requests_per_minute")
    parser.add_argument("--batch", type=int, default=32, help="the reference's batch size")
    parser.add_argument(
        "--window", type=float, default=60.0, help="the server's sliding window, seconds (the limit scales with it)"
    )
    args = parser.parse_args()
    # Every 429 would log a retry warning; the summary counts them instead.
    logging.getLogger("llamaduo.llm").setLevel(logging.ERROR)
    asyncio.run(main(args.judgments, args.latency, args.rpm, args.batch, args.window))
