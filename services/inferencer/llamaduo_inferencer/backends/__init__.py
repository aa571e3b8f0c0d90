"""Where the inferencer's answers come from: the local transformers engine, or a remote TGI / OpenAI-compatible server.

Every backend answers one conversation with `Sampling.n` completions (`Completion`: text, token counts, finish
reason, latency). Remote backends bound their own concurrency, retry transient failures with backoff and raise
`BackendError` when a request can never succeed (unknown adapter, unreachable endpoint after its retries, a prompt
longer than the server's context), so the task fails with a reason a person can act on instead of hanging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llamaduo_inferencer.generation import Completion, Message


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one request; `seed` makes sampled answers reproducible where the server supports it."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None


class BackendError(RuntimeError):
    """A request that cannot succeed: `reason` is a short machine-readable code, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RemoteBackend(Protocol):
    """A server that generates for us; `adapter` names the fine-tuned adapter to use (None: the base model)."""

    async def answer(
        self, conversation: Sequence[Message], sampling: Sampling, adapter: str | None
    ) -> list[Completion]:
        """Return `sampling.n` completions for `conversation`."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
