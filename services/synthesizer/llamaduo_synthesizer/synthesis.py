"""Growing the training set: new pairs from the service LLM, seeded by train rows, deduplicated and decontaminated."""

from __future__ import annotations

import asyncio
import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.contract.events import Spend
from llamaduo.contract.spec import SynthesisSpec, TaskSpec
from llamaduo.data.rows import ChatRow, Message
from llamaduo.llm import Ledger, LLMReply, LLMReplyError, LLMRequestError, ServiceLLM
from llamaduo_synthesizer.prompts import SCHEMA_NAME, pairs_schema, synthesis_messages

REASONS = ("empty", "too_long", "test_prompt", "exact_duplicate")
"""Why a generated pair is dropped, in the order the checks run."""
MAX_WAVE = 256
"""Most generator calls in flight per wave: bounds memory and the overshoot past `new_rows`."""
DEFAULT_MAX_CHARS = 8000
_NON_WORD = re.compile(r"[\W_]+")


class _Pair(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instruction: str
    response: str


class _PairsReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    pairs: list[_Pair] = Field(min_length=1)


@dataclass(frozen=True)
class SynthesisOutcome:
    """The kept rows, the dropped ones per reason (every reason, zeros included), the spend and the calls made."""

    rows: list[ChatRow]
    removed: dict[str, int]
    spend: Spend
    calls: int
    failed_calls: int = 0
    seeds_excluded: int = 0


def normalize(text: str) -> str:
    """Text compared for duplicates: Unicode-folded, case-folded, punctuation and whitespace runs as one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _parse_pairs(data: dict[str, Any]) -> _PairsReply:
    return _PairsReply.model_validate(data)


def _synthetic_row(seed: ChatRow, instruction: str, response: str) -> ChatRow:
    # The seed's system turns travel with the new row: the model will be served with the same system prompt.
    system = [m for m in seed.prompt_messages if m.role == "system"]
    return ChatRow(
        messages=[*system, Message(role="user", content=instruction), Message(role="assistant", content=response)],
        category=seed.category,
        origin="synthetic",
    )


async def synthesize(
    seeds: Sequence[ChatRow],
    test_rows: Sequence[ChatRow],
    existing: Sequence[ChatRow],
    llm: ServiceLLM,
    *,
    synthesis: SynthesisSpec,
    task: TaskSpec,
    new_rows: int,
    cache_scope: str,
    round_index: int,
    seed: int,
    on_progress: Callable[[int, int], None] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> SynthesisOutcome:
    """Ask the service LLM for `new_rows` new rows like the train `seeds`, one seed per call.

    Seeds are drawn without replacement (reshuffled when exhausted) from an RNG seeded by `seed` and
    `round_index`, so a redelivered task sends the same requests and is answered from the cache. Calls stop at
    `new_rows` kept rows or at `synthesis.max_calls_per_round` (default 4x the calls needed). No test row ever
    reaches a prompt; generated pairs that repeat a test prompt or an existing instruction are dropped.
    Raises `ValueError` when no seed is usable; lets `LLMUnavailable` and configuration-level
    `LLMRequestError`s through.
    """
    if new_rows <= 0:
        return SynthesisOutcome(rows=[], removed={}, spend=Spend(), calls=0)
    test_prompts = {normalize(row.prompt) for row in test_rows}
    test_texts = test_prompts | {normalize(row.reference) for row in test_rows}
    # A train row that duplicates a test row (coverage data often has repeats) would leak the test set.
    usable = [
        row for row in seeds if normalize(row.prompt) not in test_texts and normalize(row.reference) not in test_texts
    ]
    if not usable:
        raise ValueError(f"none of the {len(seeds)} train seeds can be shown to the generator")
    seen = {normalize(row.prompt) for row in existing} | {normalize(row.prompt) for row in seeds}
    rng = random.Random(f"llamaduo-synthesis:{seed}:{round_index}")
    deck: list[int] = []
    per_call = synthesis.pairs_per_call
    cap = synthesis.max_calls_per_round or 4 * math.ceil(new_rows / per_call)
    schema = pairs_schema(per_call)
    ledger = Ledger()
    kept: list[ChatRow] = []
    removed: Counter[str] = Counter()
    calls = failed_calls = 0

    def next_seed() -> ChatRow:
        if not deck:
            deck.extend(rng.sample(range(len(usable)), len(usable)))
        return usable[deck.pop()]

    async def call(seed_row: ChatRow, call_index: int) -> LLMReply[_PairsReply] | None:
        try:
            return await llm.chat_json(
                synthesis_messages(task, seed_row, per_call),
                schema=schema,
                schema_name=SCHEMA_NAME,
                validate=_parse_pairs,
                cache_scope=cache_scope,
                # Distinct per round and call: a seed drawn twice must be a new request, not a cache hit.
                nonce=(round_index << 32) + call_index,
            )
        except LLMReplyError as exc:
            ledger.add(exc)
            return None
        except LLMRequestError as exc:
            if not exc.item_level:
                raise
            return None

    while len(kept) < new_rows and calls < cap:
        wave = min(math.ceil((new_rows - len(kept)) / per_call), cap - calls, MAX_WAVE)
        plan = [(next_seed(), calls + offset) for offset in range(wave)]
        calls += wave
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(call(seed_row, index)) for seed_row, index in plan]
        except ExceptionGroup as errors:
            # Callers handle one fault (LLMUnavailable, LLMRequestError), not a group of the same fault.
            raise errors.exceptions[0] from None
        # Replies are used in call order, not completion order, so the kept rows are reproducible.
        for (seed_row, _), task_ in zip(plan, tasks, strict=True):
            reply = task_.result()
            if reply is None:
                failed_calls += 1
                continue
            ledger.add(reply)
            for pair in reply.value.pairs[:per_call]:
                if len(kept) >= new_rows:
                    break
                instruction, response = pair.instruction.strip(), pair.response.strip()
                key = normalize(instruction)
                if not key or not normalize(response):
                    removed["empty"] += 1
                elif len(instruction) + len(response) > max_chars:
                    removed["too_long"] += 1
                elif key in test_prompts:
                    removed["test_prompt"] += 1
                elif key in seen:
                    removed["exact_duplicate"] += 1
                else:
                    seen.add(key)
                    kept.append(_synthetic_row(seed_row, instruction, response))
        if on_progress is not None:
            on_progress(len(kept), new_rows)
    return SynthesisOutcome(
        rows=kept,
        removed={reason: removed[reason] for reason in REASONS},
        spend=ledger.spend,
        calls=calls,
        failed_calls=failed_calls,
        seeds_excluded=len(seeds) - len(usable),
    )
