"""Growing the training set: new pairs from the service LLM, seeded by train rows, filtered, decontaminated, deduped.

A round is a sequence of numbered calls. Call `i` shows the seed that the round's seeded schedule draws `i`-th and
carries the nonce (round, i), so the same round always sends the same requests and a restarted one is answered from
the cache. Calls go out in waves; replies are screened in call order, so the kept rows are reproducible. After a
wave the kept rows may be handed to a sink (a part file) with a `Checkpoint`; a round resumed from that checkpoint
ends with exactly the rows an uninterrupted one would have.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.contract.events import Spend
from llamaduo.contract.spec import SynthesisSpec, TaskSpec
from llamaduo.data.rows import ChatRow, Message
from llamaduo.llm import Ledger, LLMReply, LLMReplyError, LLMRequestError, ServiceLLM, SpendCapReached
from llamaduo_synthesizer.decontamination import TestSetGuard
from llamaduo_synthesizer.dedup import NearDuplicateIndex
from llamaduo_synthesizer.prompts import SCHEMA_NAME, pairs_schema, prompt_text, synthesis_messages, validate_template

if TYPE_CHECKING:
    from llamaduo_synthesizer.targeting import Targeting

REASONS = (
    "empty",
    "truncated",
    "refusal",
    "too_long",
    "test_ngram_overlap",
    "test_near_duplicate",
    "exact_duplicate",
    "near_duplicate",
)
"""Why a generated pair is dropped, in the order the checks run."""
MAX_WAVE = 256
"""Most generator calls in flight per wave: bounds memory and the overshoot past `new_rows`."""
PART_ROWS = 2000
"""Kept rows buffered before they go to the sink as one part (flushed at the end of a wave, so parts hold more)."""
_NON_WORD = re.compile(r"[\W_]+")
_TERMINAL = frozenset(".!?\u2026\u3002\uff01\uff1f")  # . ! ? … and the CJK full stop, ! and ?
# What may follow a sentence's full stop and still end it: closing quotes, brackets, markdown emphasis.
_TRAILERS = "\"'\u201d\u2019)]}*_`\u00bb \t\r\n"
_MID_SENTENCE_END = frozenset(",;:-\u2013(")
_BRACKETS = (("(", ")"), ("[", "]"), ("{", "}"))
# A straight double quote after a digit is an inch mark (5'11"), not a quotation.
_QUOTE = re.compile(r'(?<!\d)"')
_REFUSAL = re.compile(
    r"\bas an ai(?: language)? model\b"
    r"|\bas an ai assistant\b"
    r"|\bi(?:'m| am) (?:sorry|afraid),? but i (?:can't|cannot|can not|won't|am unable|am not able)\b"
    r"|\bi(?:'m| am) (?:unable|not able) to (?:help|assist|comply|fulfil|fulfill|provide that)\b"
    r"|\bi can(?:'t|not) (?:help|assist) with (?:that|this)\b"
    r"|\bi can(?:'t|not) (?:comply|fulfil|fulfill)\b",
    re.IGNORECASE,
)


def normalize(text: str) -> str:
    """Text compared for duplicates: Unicode-folded, case-folded, punctuation and whitespace runs as one space."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _ends_sentence(text: str) -> bool:
    stripped = text.rstrip(_TRAILERS)
    return bool(stripped) and stripped[-1] in _TERMINAL


def is_truncated(text: str, seed_reference: str | None = None) -> bool:
    """Whether `text` looks cut off (documented heuristic, cheap and conservative).

    Cut off means: a bracket opened and never closed, an odd number of ``` fences, more opening than closing curly
    double quotes, an odd number of straight double quotes (inch marks after a digit excepted); or, when
    `seed_reference` ends a sentence (. ! ? …), `text` ending on a letter, digit, comma, colon, semicolon or dash.
    """
    if any(text.count(opener) > text.count(closer) for opener, closer in _BRACKETS):
        return True
    if text.count("```") % 2 or text.count("“") > text.count("”") or len(_QUOTE.findall(text)) % 2:
        return True
    if seed_reference is not None and _ends_sentence(seed_reference):
        last = text.rstrip()[-1:]
        return last.isalnum() or last in _MID_SENTENCE_END
    return False


def is_refusal(text: str) -> bool:
    """Whether `text` holds assistant boilerplate ("As an AI language model", "I'm sorry, but I can't")."""
    return _REFUSAL.search(text.replace("\u2019", "'")) is not None


def quality_problem(instruction: str, response: str, seed_reference: str, max_chars: int) -> str | None:
    """The first quality reason that drops a (stripped) pair: empty, truncated, refusal or too_long; else None.

    A refusal is only a fault when the seed's answer is not itself one (some tasks teach the model to decline).
    """
    if not normalize(instruction) or not normalize(response):
        return "empty"
    if is_truncated(instruction) or is_truncated(response, seed_reference):
        return "truncated"
    if is_refusal(response) and not is_refusal(seed_reference):
        return "refusal"
    if len(instruction) > max_chars or len(response) > max_chars:
        return "too_long"
    return None


def _key(text: str) -> bytes:
    # 16-byte digests: a 256K-row round keeps its seen instructions in a few MB.
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


class PairScreen:
    """Every check a generated pair goes through, in order: quality, the test split, then duplicates.

    Duplicates are judged against every row already indexed: the training set (`index_existing`) and the pairs
    kept so far. A kept pair is indexed at once, so each duplicate cluster keeps exactly its first member.
    """

    def __init__(
        self, guard: TestSetGuard, index: NearDuplicateIndex, test_rows: Sequence[ChatRow], *, max_chars: int
    ) -> None:
        self.guard = guard
        self.index = index
        self.max_chars = max_chars
        # Whole test texts, for those shorter than the guard's n-gram (which then has nothing to match).
        self.test_texts = frozenset(
            text for row in test_rows for text in (normalize(row.prompt), normalize(row.reference)) if text
        )
        self._instructions: set[bytes] = set()

    @classmethod
    def for_spec(cls, test_rows: Sequence[ChatRow], synthesis: SynthesisSpec) -> PairScreen:
        """A screen with the spec's decontamination and near-duplicate settings."""
        guard = TestSetGuard(
            test_rows, ngram=synthesis.decontamination_ngram, threshold=synthesis.decontamination_threshold
        )
        index = NearDuplicateIndex(threshold=synthesis.near_duplicate_threshold)
        return cls(guard, index, test_rows, max_chars=synthesis.max_row_chars)

    def index_existing(self, rows: Iterable[ChatRow]) -> None:
        """Index rows already in the training set (or kept earlier this round) without judging them."""
        batch = list(rows)
        self._instructions.update(_key(row.prompt) for row in batch)
        self.index.extend(row.reference for row in batch)

    def usable_seed(self, row: ChatRow) -> bool:
        """Whether a train row may be shown to the generator: it must not repeat or overlap the test split."""
        if normalize(row.prompt) in self.test_texts or normalize(row.reference) in self.test_texts:
            return False
        return self.guard.check(row.prompt, row.reference) is None

    def leaks(self, prompt: str) -> bool:
        """Whether a generator prompt carries test text; such a prompt is never sent."""
        return self.guard.leaks(prompt)

    def screen(self, instruction: str, response: str, seed_reference: str) -> str | None:
        """The reason a stripped pair is dropped, or None when it is kept (and then indexed)."""
        return self.screen_many([(instruction, response, seed_reference)], limit=1)[0]

    def screen_many(self, pairs: Sequence[tuple[str, str, str]], *, limit: int) -> list[str | None]:
        """`screen` for (instruction, response, seed reference) triples in order, until `limit` of them are kept.

        The result covers the pairs examined: it is shorter than `pairs` when the limit was reached. The test-split
        check runs on the whole batch at once; duplicates are judged one by one, so earlier pairs win.
        """
        reasons = [quality_problem(i, r, seed_reference, self.max_chars) for i, r, seed_reference in pairs]
        clean = [k for k, reason in enumerate(reasons) if reason is None]
        for k, leak in zip(clean, self.guard.check_many([pairs[k][:2] for k in clean]), strict=True):
            reasons[k] = leak
        examined: list[str | None] = []
        kept = 0
        for (instruction, response, _), reason in zip(pairs, reasons, strict=True):
            if kept >= limit:
                break
            if reason is None:
                reason = self._duplicate(instruction, response)
            examined.append(reason)
            kept += reason is None
        return examined

    def _duplicate(self, instruction: str, response: str) -> str | None:
        if normalize(instruction) in self.test_texts or normalize(response) in self.test_texts:
            return "test_near_duplicate"  # a whole test text too short for the guard: the nearest of duplicates
        key = _key(instruction)
        if key in self._instructions:
            return "exact_duplicate"  # the same question twice teaches nothing new, or two answers to one
        reason = self.index.add(response)
        if reason is None:
            self._instructions.add(key)
        return reason


class SeedSchedule:
    """Which seed each call shows: balanced across categories, without replacement within each category.

    Categories take turns by smooth weighted round-robin (even weights: plain round-robin, in a shuffled order);
    each category's seeds are shuffled and drawn without replacement, reshuffled once all were shown. The draws
    depend only on the RNG, never on replies, so call `i` always shows the same seed.
    """

    def __init__(
        self, seeds: Sequence[ChatRow], rng: random.Random, weights: Mapping[str | None, float] | None = None
    ) -> None:
        groups: dict[str | None, list[ChatRow]] = {}
        for row in seeds:
            groups.setdefault(row.category, []).append(row)
        order = sorted(groups, key=lambda category: category or "")
        rng.shuffle(order)  # which category goes first (and wins ties) is drawn too
        self._rng = rng
        self._groups = [groups[category] for category in order]
        weights = weights or {}
        floor = min((w for w in weights.values() if w > 0), default=1.0)
        # A category without a weight of its own (or a non-positive one) gets the smallest: covered, not favoured.
        self._weights = [w if (w := weights.get(category, 0.0)) > 0 else floor for category in order]
        self._total = sum(self._weights)
        self._credit = [0.0] * len(order)
        self._decks: list[list[ChatRow]] = [[] for _ in order]

    def next(self) -> ChatRow:
        """The seed of the next call."""
        for i, weight in enumerate(self._weights):
            self._credit[i] += weight
        best = max(range(len(self._credit)), key=lambda i: (self._credit[i], -i))
        self._credit[best] -= self._total
        deck = self._decks[best]
        if not deck:
            group = self._groups[best]
            deck.extend(self._rng.sample(group, len(group)))
        return deck.pop()


class Checkpoint(BaseModel):
    """Where a round stands after a wave: enough to continue it exactly as an uninterrupted run would."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slots: int = Field(default=0, ge=0, description="Call numbers used: requests sent plus prompts withheld.")
    calls: int = Field(default=0, ge=0, description="Requests sent to the service LLM.")
    kept: int = Field(default=0, ge=0)
    failed_calls: int = Field(default=0, ge=0)
    withheld: int = Field(default=0, ge=0, description="Prompts never sent because they carried test text.")
    removed: dict[str, int] = Field(default_factory=dict)
    spend: Spend = Field(default_factory=Spend)


class _Pair(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instruction: str
    response: str


class _PairsReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    pairs: list[_Pair] = Field(min_length=1)


@dataclass(frozen=True)
class SynthesisOutcome:
    """The kept rows (when no sink took them), the drops per reason (every reason, zeros included), spend, calls."""

    rows: list[ChatRow]
    kept: int
    removed: dict[str, int]
    spend: Spend
    calls: int
    failed_calls: int = 0
    seeds_excluded: int = 0
    withheld: int = 0
    budget_exhausted: bool = False


Sink = Callable[[list[ChatRow], Checkpoint], Awaitable[None]]
"""Receives kept rows as they come, with the checkpoint that holds once they are stored."""


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


def _as_paid(spend: Spend) -> Spend:
    # Calls of an earlier delivery were paid then: this run reports them, like cache hits, without paying again.
    return spend.model_copy(update={"cached_calls": spend.calls, "cached_usd": spend.usd})


async def synthesize(
    seeds: Sequence[ChatRow],
    llm: ServiceLLM,
    screen: PairScreen,
    *,
    synthesis: SynthesisSpec,
    task: TaskSpec,
    new_rows: int,
    cache_scope: str,
    round_index: int,
    seed: int,
    targeting: Targeting | None = None,
    resume: Checkpoint | None = None,
    sink: Sink | None = None,
    part_rows: int = PART_ROWS,
    max_wave: int = MAX_WAVE,
    on_progress: Callable[[int, int], None] | None = None,
) -> SynthesisOutcome:
    """Ask the service LLM for `new_rows` new rows like the train `seeds`, one seed per call.

    `screen` already indexes the training set (and, when resuming, the rows the sink was given). Calls stop at
    `new_rows` kept rows or at `max_calls_per_round` (default 4x the calls needed). No prompt that carries test
    text is sent: its call is counted as withheld. With a `sink`, kept rows are handed over after a wave once
    `part_rows` are buffered (and at the end), and the outcome's `rows` is empty; `resume` continues from a
    checkpoint a sink was given. Raises `TemplateError` for a bad `prompt_template`, `ValueError` when no seed is
    usable; lets `LLMUnavailable` and configuration-level `LLMRequestError`s through.
    """
    state = resume or Checkpoint()
    if synthesis.prompt_template is not None:
        validate_template(synthesis.prompt_template)
    if new_rows <= 0:
        return SynthesisOutcome(rows=[], kept=0, removed=dict.fromkeys(REASONS, 0), spend=Spend(), calls=0)
    usable = await asyncio.to_thread(lambda: [row for row in seeds if screen.usable_seed(row)])
    if not usable:
        raise ValueError(f"none of the {len(seeds)} train seeds can be shown to the generator")
    rng = random.Random(f"llamaduo-synthesis:{seed}:{round_index}")
    schedule = SeedSchedule(usable, rng, targeting.weights if targeting is not None else None)
    for _ in range(state.slots):
        schedule.next()  # the draws of the calls made before the checkpoint
    per_call = synthesis.pairs_per_call
    cap = synthesis.max_calls_per_round or 4 * math.ceil(new_rows / per_call)
    schema = pairs_schema(per_call)
    ledger = Ledger()
    ledger.add(_as_paid(state.spend))
    removed: Counter[str] = Counter(state.removed)
    slots, calls, kept = state.slots, state.calls, state.kept
    failed_calls, withheld = state.failed_calls, state.withheld
    buffer: list[ChatRow] = []
    collected: list[ChatRow] = []
    exhausted = False
    refused = 0

    async def call(messages: list[dict[str, str]], index: int) -> LLMReply[_PairsReply] | None:
        try:
            return await llm.chat_json(
                messages,
                schema=schema,
                schema_name=SCHEMA_NAME,
                validate=_parse_pairs,
                cache_scope=cache_scope,
                # Distinct per round and call: a seed drawn twice must be a new request, not a cache hit.
                nonce=(round_index << 32) + index,
            )
        except LLMReplyError as exc:
            ledger.add(exc)
            return None
        except LLMRequestError as exc:
            if not exc.item_level:
                raise
            return None
        except SpendCapReached:
            # Not sent, not paid: the migration's dollar cap ends the round with the rows kept so far.
            nonlocal exhausted, refused
            exhausted = True
            refused += 1
            return None

    def build(seed_row: ChatRow) -> tuple[list[dict[str, str]], bool]:
        focus = targeting.focus_for(seed_row.category) if targeting is not None else ""
        messages = synthesis_messages(task, seed_row, per_call, template=synthesis.prompt_template, focus=focus)
        return messages, screen.leaks(prompt_text(messages))

    def keep(plan: list[tuple[ChatRow, LLMReply[_PairsReply] | None]]) -> list[ChatRow]:
        nonlocal kept
        candidates = [
            (seed_row, pair.instruction.strip(), pair.response.strip())
            for seed_row, reply in plan
            if reply is not None
            for pair in reply.value.pairs[:per_call]
        ]
        reasons = screen.screen_many(
            [(instruction, response, row.reference) for row, instruction, response in candidates],
            limit=new_rows - kept,
        )
        new: list[ChatRow] = []
        for (seed_row, instruction, response), reason in zip(candidates, reasons, strict=False):
            if reason is not None:
                removed[reason] += 1
            else:
                new.append(_synthetic_row(seed_row, instruction, response))
        kept += len(new)
        return new

    while kept < new_rows and slots < cap:
        wave = min(math.ceil((new_rows - kept) / per_call), cap - slots, max_wave)
        seeds_of_wave = [schedule.next() for _ in range(wave)]
        # Rendering and the leak screen cost CPU: off the event loop, so heartbeats keep flowing.
        built = await asyncio.to_thread(lambda rows: [build(row) for row in rows], seeds_of_wave)
        sent = [
            (slots + offset, row, messages)
            for offset, (row, (messages, leak)) in enumerate(zip(seeds_of_wave, built, strict=True))
            if not leak
        ]
        withheld += wave - len(sent)
        slots += wave
        calls += len(sent)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(call(messages, index)) for index, _, messages in sent]
        except ExceptionGroup as errors:
            # Callers handle one fault (LLMUnavailable, LLMRequestError), not a group of the same fault.
            raise errors.exceptions[0] from None
        replies = [task_.result() for task_ in tasks]
        # Calls the cap refused were never sent: they are neither calls nor failures.
        calls -= refused
        failed_calls -= refused
        refused = 0
        for reply in replies:
            if reply is None:
                failed_calls += 1
            else:
                ledger.add(reply)
        # Replies are screened in call order, not completion order, so the kept rows are reproducible.
        plan = [(row, reply) for (_, row, _), reply in zip(sent, replies, strict=True)]
        new = await asyncio.to_thread(keep, plan)
        finished = kept >= new_rows or slots >= cap or exhausted
        if sink is None:
            collected.extend(new)
        else:
            buffer.extend(new)
            if buffer and (len(buffer) >= part_rows or finished):
                checkpoint = Checkpoint(
                    slots=slots,
                    calls=calls,
                    kept=kept,
                    failed_calls=failed_calls,
                    withheld=withheld,
                    removed={reason: removed[reason] for reason in REASONS},
                    spend=ledger.spend,
                )
                await sink(buffer, checkpoint)
                buffer = []
        if on_progress is not None:
            on_progress(kept, new_rows)
        if exhausted:
            break
    return SynthesisOutcome(
        rows=collected,
        kept=kept,
        removed={reason: removed[reason] for reason in REASONS},
        spend=ledger.spend,
        calls=calls,
        failed_calls=failed_calls,
        seeds_excluded=len(seeds) - len(usable),
        withheld=withheld,
        budget_exhausted=exhausted,
    )
