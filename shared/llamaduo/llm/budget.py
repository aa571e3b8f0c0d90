"""A migration's hard dollar cap, enforced before each service-LLM call rather than noticed after it.

A task learns what its migration has spent so far (the coordinator's ledger) and gives its clients one `SpendCap`
for the rest. Before a request goes on the wire its worst case (the prompt's estimated tokens at the input price plus
`max_tokens` at the output price) is reserved; a request whose worst case would pass the cap is refused with
`SpendCapReached` and costs nothing. When the reply comes back the reservation is replaced by what it really cost.
So the ledger never passes the cap, and the task stops with what it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamaduo.llm.limits import estimate_tokens


class SpendCapReached(Exception):
    """The next service-LLM call could pass the migration's dollar cap; it was not sent."""

    reason = "budget:cost"


# A token is about four characters of English; three keeps the estimate on the safe side.
CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8


def estimate_prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """A generous estimate of a conversation's prompt tokens, without a tokenizer (role markers included)."""
    return estimate_tokens(messages, 0, chars_per_token=CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * len(messages)


@dataclass
class SpendCap:
    """Dollars a task may still spend; shared by every client of the task (one event loop, no locking needed)."""

    limit_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0

    @classmethod
    def for_migration(cls, max_cost_usd: float | None, spent_usd: float) -> SpendCap | None:
        """The cap for a task of a migration that has spent `spent_usd` so far; None without a cap."""
        if max_cost_usd is None:
            return None
        return cls(limit_usd=max_cost_usd, spent_usd=spent_usd)

    @property
    def remaining_usd(self) -> float:
        """What is left once the calls in flight are paid at their worst."""
        return self.limit_usd - self.spent_usd - self.reserved_usd

    def reserve(self, usd: float) -> float:
        """Reserve a call's worst case, or raise SpendCapReached when it could pass the cap."""
        if usd > self.remaining_usd + 1e-12:
            raise SpendCapReached(
                f"a call costing up to ${usd:.6f} could pass the cap of ${self.limit_usd:.4f}: "
                f"${self.spent_usd:.6f} spent, ${self.reserved_usd:.6f} in flight"
            )
        self.reserved_usd += usd
        return usd

    def settle(self, reserved: float, actual_usd: float) -> None:
        """Replace a reservation by the call's real cost (0 when it failed without a charge)."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved)
        self.spent_usd += actual_usd
