"""What the remote backends share: retry policy, transient failures, stop-string and error-message handling."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 429})
"""Client-error statuses that are worth retrying; every 5xx is retried too."""
PROMPT_TOO_LONG_HINTS = (
    "must have less than",
    "inputs` tokens + `max_new_tokens`",
    "inputs tokens + max_new_tokens",
    "maximum context length",
    "context length",
    "too long",
)
"""Phrases of servers' validation errors for a prompt that does not fit (TGI, vLLM, OpenAI)."""


@dataclass
class RetryPolicy:
    """How transient failures are retried: `max_retries` more attempts, full-jitter exponential backoff.

    The delay before retry k (0-based) is uniform in [0, min(backoff_max_s, backoff_base_s * 2**k)], but never
    shorter than the server's Retry-After (itself capped at `max_retry_after_s`).
    """

    max_retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    max_retry_after_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retrying after failed attempt number `attempt` (0-based)."""
        jitter = self.rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
        if retry_after is None:
            return jitter
        return max(min(retry_after, self.max_retry_after_s), jitter)


@dataclass(frozen=True)
class Transient:
    """A failed attempt that may succeed if tried again: what went wrong, and the server's Retry-After if any."""

    problem: str
    retry_after_s: float | None = None


async def gather_or_cancel(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Await all concurrently and return their results in order; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def strip_stop(text: str, stop: Sequence[str]) -> str:
    """`text` without a stop string at its end (servers that stop on a string may keep it in the output)."""
    for s in sorted((s for s in stop if s), key=len, reverse=True):
        if text.endswith(s):
            return text[: -len(s)]
    return text


def is_prompt_too_long(detail: str) -> bool:
    """Whether a server's validation message says the prompt (plus the tokens asked for) exceeds its context."""
    lowered = detail.lower()
    return any(hint.lower() in lowered for hint in PROMPT_TOO_LONG_HINTS)


def scrub(text: str, secret: str | None) -> str:
    """`text` with the API key masked, in case a server or library echoes it back."""
    return text.replace(secret, "***") if secret else text
