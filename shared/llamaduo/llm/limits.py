"""Requests-per-minute and tokens-per-minute limits of a service LLM, shared by every client of one process.

A provider's quota belongs to the API key and the model, not to one of our `ServiceLLM` objects: a judge replica that
handles several tasks at once, or judges with two clients of the same model, builds several clients that draw on the
same quota. Separate buckets would each allow the full rate and together overrun it, so `shared_limits` keeps one
`RateLimits` per (base_url, model) in a module-level registry. The registry is also keyed by the running event loop,
because asyncio locks belong to one loop (tests run many loops in one process).

Both limits are token buckets that refill continuously. A request reserves its estimated tokens before it is sent
(prompt characters / 4 + max_tokens: a deliberate over-estimate, since the completion is usually shorter) and the
reservation is corrected by the real usage afterwards. A 429 with Retry-After pauses the shared limits, so every caller
backs off, not only the one that was told. A refused attempt keeps its request slot: OpenAI counts unsuccessful
requests against the per-minute limit too, so a retry is another request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

BURST_S = 1.0
"""A bucket holds this many seconds of its rate: providers enforce per-minute limits over short slices of the minute,
so a full minute's burst would be answered with 429s."""
_EPSILON_S = 1e-6


class TokenBucket:
    """`per_minute` units refilling continuously up to `burst_s` seconds' worth; waiters are served in arrival order."""

    def __init__(
        self,
        per_minute: float,
        *,
        burst_s: float = BURST_S,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._updated = clock()
        self._level = 0.0
        self.per_minute = 0.0
        self.rate = 0.0
        self.capacity = 0.0
        self.configure(per_minute, burst_s)
        self._level = self.capacity

    def configure(self, per_minute: float, burst_s: float = BURST_S) -> None:
        """Change the rate (what accrued so far at the old rate is kept, up to the new capacity)."""
        if per_minute <= 0 or burst_s <= 0:
            raise ValueError(f"a rate limit must be positive, got {per_minute}/min with a {burst_s} s burst")
        self._refill()
        self.per_minute = float(per_minute)
        self.rate = self.per_minute / 60.0
        # At least one whole unit, or a bucket of fewer than 60/min could never admit a request.
        self.capacity = max(1.0, self.rate * burst_s)
        self._level = min(self._level, self.capacity)

    def _refill(self) -> float:
        now = self._clock()
        if now > self._updated:
            self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
            self._updated = now
        return now

    @property
    def level(self) -> float:
        """Units available now (negative while reservations exceed what has accrued)."""
        self._refill()
        return self._level

    def delay(self, amount: float) -> float:
        """Seconds until `amount` units could be taken (0 when they can be taken now)."""
        now = self._refill()
        # More than a full bucket is admitted once the bucket is full, then paid off as debt by later callers.
        need = min(amount, self.capacity)
        held = max(0.0, self._updated - now)  # during a pause nothing accrues
        return held + max(0.0, (need - self._level) / self.rate)

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait until `amount` units are there and take them; returns the seconds waited."""
        started = self._clock()
        # One waiter at a time, in arrival order (asyncio.Lock is FIFO): a small request can't starve a large one.
        async with self._lock:
            while (wait := self.delay(amount)) > _EPSILON_S:
                await self._sleep(wait)
            self._level -= amount
        return max(0.0, self._clock() - started)

    def refund(self, amount: float) -> None:
        """Give units back (or, negative, take more): the correction of an estimate by what was really used."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def hold(self, until: float) -> None:
        """Accrue nothing before clock time `until`, and refill from empty after it."""
        self._refill()
        self._level = min(self._level, 0.0)
        self._updated = max(self._updated, until)


class RateLimits:
    """The request and token buckets of one (base_url, model), and the pause that a 429's Retry-After imposes."""

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        burst_s: float = BURST_S,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._burst_s = burst_s
        self._paused_until = -math.inf
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.pauses = 0
        self.configure(requests_per_minute, tokens_per_minute)

    def configure(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Set or change both limits (None: unlimited); buckets that stay keep what they have accrued."""
        self.requests = self._bucket(self.requests, requests_per_minute)
        self.tokens = self._bucket(self.tokens, tokens_per_minute)

    def _bucket(self, current: TokenBucket | None, per_minute: int | None) -> TokenBucket | None:
        if per_minute is None:
            return None
        if current is None:
            return TokenBucket(per_minute, burst_s=self._burst_s, clock=self._clock, sleep=self._sleep)
        if current.per_minute != per_minute:
            current.configure(per_minute, self._burst_s)
        return current

    @property
    def limits(self) -> tuple[int | None, int | None]:
        """(requests per minute, tokens per minute); None where unlimited."""
        return (
            None if self.requests is None else int(self.requests.per_minute),
            None if self.tokens is None else int(self.tokens.per_minute),
        )

    @property
    def paused_for(self) -> float:
        """Seconds the shared pause still lasts (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for the pause, a request slot and `tokens` estimated tokens, and take them; returns seconds waited."""
        started = self._clock()
        while (pause := self.paused_for) > _EPSILON_S:
            await self._sleep(pause)
        took_request = False
        try:
            if self.requests is not None:
                await self.requests.acquire(1)
                took_request = True
            if self.tokens is not None and tokens > 0:
                await self.tokens.acquire(tokens)
        except asyncio.CancelledError:
            # A cancelled caller sends nothing: its request slot goes back to the others.
            if took_request and self.requests is not None:
                self.requests.refund(1)
            raise
        return max(0.0, self._clock() - started)

    def settle(self, reserved: int, used: int) -> None:
        """Correct a token reservation by the real usage (`used` 0 when the server processed nothing)."""
        if self.tokens is not None and reserved != used:
            self.tokens.refund(reserved - used)

    def pause(self, seconds: float) -> None:
        """Make every caller wait `seconds` from now; the buckets accrue nothing meanwhile and restart empty."""
        if seconds <= 0:
            return
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self.pauses += 1
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.hold(until)


_REGISTRY: dict[asyncio.AbstractEventLoop, dict[tuple[str, str], RateLimits]] = {}


def shared_limits(
    base_url: str, model: str, *, requests_per_minute: int | None, tokens_per_minute: int | None
) -> RateLimits:
    """The limits every client of this process and event loop shares for (base_url, model); call inside the loop.

    Clients normally come from the same settings; when two disagree, the latest configuration wins (logged).
    """
    loop = asyncio.get_running_loop()
    for closed in [other for other in _REGISTRY if other.is_closed()]:
        del _REGISTRY[closed]
    per_loop = _REGISTRY.setdefault(loop, {})
    key = (base_url.rstrip("/"), model)
    limits = per_loop.get(key)
    if limits is None:
        limits = per_loop[key] = RateLimits(requests_per_minute, tokens_per_minute)
    elif limits.limits != (requests_per_minute, tokens_per_minute):
        log.info(
            "service-LLM limits for %s at %s change from %s to %s",
            model,
            base_url,
            limits.limits,
            (requests_per_minute, tokens_per_minute),
        )
        limits.configure(requests_per_minute, tokens_per_minute)
    return limits


def estimate_tokens(
    messages: Sequence[dict[str, str]], max_tokens: int, extra_chars: int = 0, chars_per_token: int = 4
) -> int:
    """The tokens a request may use at most, roughly: its characters / `chars_per_token` plus the completion's
    `max_tokens` (4 characters a token is typical English; 3 stays on the safe side for code and other scripts)."""
    chars = sum(len(str(m.get("content") or "")) for m in messages) + extra_chars
    return chars // chars_per_token + max_tokens
