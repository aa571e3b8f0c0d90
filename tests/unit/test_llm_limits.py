"""Rate limits of the service-LLM client: token buckets on a fake clock, the shared registry, and 429 storms."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from llamaduo.llm import RateLimits, ServiceLLM, TokenBucket, shared_limits
from llamaduo.store import LocalStore
from tests.support.llm import make_service_llm
from tests.support.scripted_llm import Fault, ScriptedLLM

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"similarity": {"type": "integer"}, "precision": {"type": "integer"}, "reason": {"type": "string"}},
    "required": ["similarity", "precision", "reason"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Judge this."}]
# The test session runs one event loop, so the process-wide registry outlives a test: each test that uses it
# talks to a model name of its own.
_MODELS = itertools.count()


def fresh_model() -> str:
    return f"limits-model-{next(_MODELS)}"


class FakeClock:
    """A monotonic clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(judge_score=70) as scripted:
        yield scripted


async def ask(llm: ServiceLLM, nonce: int = 0) -> Any:
    return await llm.chat_json(MESSAGES, schema=SCHEMA, schema_name="judgment", cache_scope="mig-limits", nonce=nonce)


# ---- token buckets on a fake clock ----


async def test_bucket_bursts_then_paces_at_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(600, clock=clock, sleep=clock.sleep)  # 10/s, a one-second burst of 10
    start = clock.now
    for _ in range(30):
        await bucket.acquire()
    # The first 10 come from the full bucket, the other 20 at 0.1 s each.
    assert clock.now - start == pytest.approx(2.0)
    assert bucket.level == pytest.approx(0.0, abs=1e-9)


async def test_bucket_refills_continuously_up_to_its_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(120, clock=clock, sleep=clock.sleep)  # 2/s, capacity 2
    await bucket.acquire(2)
    clock.now += 0.25
    assert bucket.level == pytest.approx(0.5)
    clock.now += 100
    assert bucket.level == pytest.approx(2.0)


async def test_slow_bucket_still_admits_one_request() -> None:
    clock = FakeClock()
    bucket = TokenBucket(6, clock=clock, sleep=clock.sleep)  # one every 10 s: capacity is one whole request
    start = clock.now
    await bucket.acquire()
    await bucket.acquire()
    assert clock.now - start == pytest.approx(10.0)


async def test_concurrent_waiters_are_served_in_arrival_order() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock, sleep=clock.sleep)  # 1/s, capacity 1
    served: list[tuple[int, float]] = []

    async def take(n: int, amount: float) -> None:
        await bucket.acquire(amount)
        served.append((n, clock.now))

    start = clock.now
    await asyncio.gather(take(0, 1), take(1, 1), take(2, 1), take(3, 1))
    assert [n for n, _ in served] == [0, 1, 2, 3]
    assert [t - start for _, t in served] == pytest.approx([0.0, 1.0, 2.0, 3.0])


async def test_request_larger_than_the_bucket_is_admitted_then_paid_off() -> None:
    clock = FakeClock()
    bucket = TokenBucket(600, clock=clock, sleep=clock.sleep)  # 10 tokens/s, capacity 10
    start = clock.now
    await bucket.acquire(50)  # more than a full bucket: admitted at once, leaving a debt of 40
    assert clock.now == start
    await bucket.acquire(1)
    assert clock.now - start == pytest.approx(4.1)


async def test_refund_corrects_an_estimate_both_ways() -> None:
    clock = FakeClock()
    limits = RateLimits(tokens_per_minute=6000, clock=clock, sleep=clock.sleep)  # 100/s, capacity 100
    assert limits.tokens is not None
    await limits.acquire(tokens=80)
    limits.settle(reserved=80, used=30)  # the reply was shorter than max_tokens: 50 come back
    assert limits.tokens.level == pytest.approx(70.0)
    limits.settle(reserved=10, used=110)  # longer than estimated: the difference is owed
    assert limits.tokens.level == pytest.approx(-30.0)
    start = clock.now
    await limits.acquire(tokens=20)
    assert clock.now - start == pytest.approx(0.5)


async def test_pause_holds_every_caller_and_restarts_the_bucket_empty() -> None:
    clock = FakeClock()
    limits = RateLimits(requests_per_minute=600, clock=clock, sleep=clock.sleep)
    start = clock.now
    limits.pause(5.0)
    assert limits.paused_for == pytest.approx(5.0)
    await limits.acquire()
    # Nothing accrued during the pause, so the first request after it waits one interval (0.1 s), not zero:
    # a whole bucket released at once would be another burst into a server that just said no.
    assert clock.now - start == pytest.approx(5.1)
    assert limits.pauses == 1


async def test_pause_without_configured_limits_still_holds_callers() -> None:
    clock = FakeClock()
    limits = RateLimits(clock=clock, sleep=clock.sleep)
    limits.pause(2.0)
    limits.pause(1.0)  # a shorter pause never shortens a longer one
    start = clock.now
    await limits.acquire(tokens=1000)
    assert clock.now - start == pytest.approx(2.0)
    assert limits.pauses == 1


async def test_cancelled_waiter_gives_its_request_slot_back() -> None:
    limits = RateLimits(requests_per_minute=600, tokens_per_minute=60)  # 1 token/s
    assert limits.requests is not None
    await limits.acquire(tokens=30)  # leaves a 29-token debt: the next caller waits half a minute for tokens
    waiter = asyncio.create_task(limits.acquire(tokens=1))
    await asyncio.sleep(0.02)
    level = limits.requests.level
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limits.requests.level == pytest.approx(level + 1, abs=0.5)


async def test_reconfiguring_keeps_what_accrued() -> None:
    clock = FakeClock()
    limits = RateLimits(requests_per_minute=600, clock=clock, sleep=clock.sleep)
    assert limits.requests is not None
    bucket = limits.requests
    limits.configure(1200, None)
    assert limits.requests is bucket and limits.limits == (1200, None)
    limits.configure(None, 5000)
    assert limits.requests is None and limits.tokens is not None


# ---- the process-wide registry ----


async def test_clients_of_one_endpoint_share_their_limits(server: ScriptedLLM, store: LocalStore) -> None:
    model = fresh_model()
    a = make_service_llm(server, store, shared_limits=True, model=model, requests_per_minute=600)
    b = make_service_llm(server, store, shared_limits=True, model=model, requests_per_minute=600)
    other = make_service_llm(server, store, shared_limits=True, model=fresh_model(), requests_per_minute=600)
    async with a, b, other:
        assert a.limits is b.limits
        assert other.limits is not a.limits
        assert a.limits is shared_limits(server.base_url + "/", model, requests_per_minute=600, tokens_per_minute=None)
        # The latest configuration wins, for every client of the endpoint.
        shared_limits(server.base_url, model, requests_per_minute=1200, tokens_per_minute=None)
        assert b.limits.limits == (1200, None)


async def test_requests_per_minute_paces_the_http_calls(server: ScriptedLLM, store: LocalStore) -> None:
    async with make_service_llm(server, store, requests_per_minute=600) as llm:  # 10/s after a burst of 10
        started = time.monotonic()
        await asyncio.gather(*(ask(llm, nonce=n) for n in range(15)))
        elapsed = time.monotonic() - started
    assert len(server.requests) == 15
    assert elapsed >= 0.45
    assert llm.stats.limiter_wait_s > 0


async def test_cache_hits_consume_no_rate_budget(server: ScriptedLLM, store: LocalStore) -> None:
    clock = FakeClock()
    limits = RateLimits(requests_per_minute=60, clock=clock, sleep=clock.sleep)  # one request a second
    async with make_service_llm(server, store) as llm:
        llm = ServiceLLM(llm.llm, store, limits=limits)
        start = clock.now
        await ask(llm)
        for _ in range(5):
            assert (await ask(llm)).cached
        assert clock.now == start  # five cache hits, no waiting
        await ask(llm, nonce=1)
        assert clock.now - start == pytest.approx(1.0)
        await llm.aclose()
    assert len(server.requests) == 2
    assert llm.stats.cache_hits == 5 and llm.stats.http_requests == 2


async def test_token_reservation_is_corrected_by_the_real_usage(server: ScriptedLLM, store: LocalStore) -> None:
    clock = FakeClock()
    limits = RateLimits(tokens_per_minute=600_000, clock=clock, sleep=clock.sleep)  # capacity 10,000
    assert limits.tokens is not None
    async with make_service_llm(server, store) as llm:
        llm = ServiceLLM(llm.llm, store, limits=limits)
        reply = await ask(llm)
        await llm.aclose()
    used = reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The reservation (prompt/4 + max_tokens=512) was far larger; only the tokens really used stay taken.
    assert limits.tokens.level == pytest.approx(10_000 - used)


# ---- 429s from the server ----


async def test_retry_after_pauses_every_client_of_the_endpoint(server: ScriptedLLM, store: LocalStore) -> None:
    model = fresh_model()
    server.script(Fault.rate_limit(0.6))
    a = make_service_llm(server, store, shared_limits=True, model=model)
    b = make_service_llm(server, store, shared_limits=True, model=model)
    async with a, b:
        first = asyncio.create_task(ask(a, nonce=0))
        deadline = time.monotonic() + 3
        while a.limits.paused_for == 0:
            assert time.monotonic() < deadline, "the 429 never paused the shared limits"
            await asyncio.sleep(0.005)
        started = time.monotonic()
        await ask(b, nonce=1)  # b was never told to wait, but waits with everyone
        waited = time.monotonic() - started
        await first
    assert waited >= 0.5
    assert a.stats.rate_limited == 1 and a.stats.http_requests == 2
    assert b.stats.rate_limited == 0 and b.stats.http_requests == 1


async def test_a_429_storm_is_survived_through_the_shared_limits(store: LocalStore) -> None:
    # 4 requests per 0.3 s sliding window on the server; two clients (2 in flight each, no rate limit of their own)
    # have 16 requests to make.
    with ScriptedLLM(judge_score=70, rpm_limit=4, rate_window_s=0.3) as server:
        model = fresh_model()
        a = make_service_llm(server, store, shared_limits=True, model=model, max_retries=30, max_concurrency=2)
        b = make_service_llm(server, store, shared_limits=True, model=model, max_retries=30, max_concurrency=2)
        async with a, b:
            started = time.monotonic()
            replies = await asyncio.gather(*(ask(a if n % 2 else b, nonce=n) for n in range(16)))
            elapsed = time.monotonic() - started
        storm = server.rate_limited
    assert all(r.value["similarity"] == 70 for r in replies)
    assert storm > 0 and a.limits.pauses > 0
    assert a.stats.rate_limited + b.stats.rate_limited == storm
    # 16 accepted at 4 per 0.3 s: the last one no earlier than 0.9 s after the first.
    assert elapsed >= 0.85
    # Only requests already in flight (4) meet a full window; the rest wait in the shared pause instead of each
    # collecting a 429 of its own. Measured: 12 refusals here, 24 when every caller backs off alone.
    assert storm <= 16


async def test_scripted_server_enforces_a_sliding_window_with_retry_after() -> None:
    with ScriptedLLM(rpm_limit=2) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        body: dict[str, Any] = {"model": "m", "messages": MESSAGES}
        await client.chat.completions.create(**body)
        await client.chat.completions.create(**body)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**body)
        await client.close()
        assert server.rate_limited == 1
    retry_after = float(caught.value.response.headers["Retry-After"])
    assert 59.0 < retry_after <= 60.0
