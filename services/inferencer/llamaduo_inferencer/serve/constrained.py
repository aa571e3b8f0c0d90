"""JSON-schema constrained decoding with outlines-core, with a token budget that always closes the JSON.

The schema becomes a regular expression (`outlines_core.json_schema.build_regex_from_schema`) and then a token-level
automaton (`outlines_core.Index`) over the model's vocabulary; a transformers `LogitsProcessor` masks every token the
automaton does not allow. Compiled automata are cached per schema.

A bare automaton guarantees a prefix of valid JSON only: a model that keeps writing a string runs into `max_tokens`
and leaves the JSON open. So each compiled grammar also knows, for every automaton state, the fewest tokens that
reach an accepting state (counted over single-character tokens, which every byte-level vocabulary has). Once the
remaining budget gets that tight, only tokens that keep completion reachable are allowed, and the output always
parses.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from outlines_core import Guide, Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema
from transformers import LogitsProcessor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

JsonSchema = dict[str, Any]

# One optional space between JSON tokens: enough for readable output, and a bounded choice for the model.
WHITESPACE_PATTERN = r"[ ]?"
# Integer ranges up to this size are spelled out as enums: outlines-core ignores minimum/maximum.
MAX_ENUMERATED_RANGE = 1000
# JSON Schema keywords whose constraints outlines-core does not encode; outputs are still validated afterwards.
UNENFORCED_KEYWORDS = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "contains",
        "not",
        "if",
        "then",
        "else",
        "patternProperties",
        "propertyNames",
        "minProperties",
        "maxProperties",
        "dependentRequired",
        "dependentSchemas",
    }
)
LITERAL_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
# Free-form JSON for `response_format: {"type": "json_object"}`.
JSON_OBJECT_SCHEMA: JsonSchema = {"type": "object"}
# How many of the model's favourite multi-character tokens are checked for feasibility when the budget is tight.
TIGHT_CANDIDATES = 16


class SchemaError(ValueError):
    """The schema cannot be compiled into a decoding constraint."""


def normalize_schema(schema: Any) -> Any:
    """Return a copy of `schema` with bounded integer ranges rewritten as enums that outlines-core can enforce."""
    if isinstance(schema, list):
        return [normalize_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    # enum/const/default/examples hold JSON values, not schemas: they are copied as they are.
    result = {key: value if key in LITERAL_KEYWORDS else normalize_schema(value) for key, value in schema.items()}
    if result.get("type") == "integer" and "enum" not in result:
        low = _bound(result, "minimum", "exclusiveMinimum", 1)
        high = _bound(result, "maximum", "exclusiveMaximum", -1)
        if low is not None and high is not None and 0 <= high - low < MAX_ENUMERATED_RANGE:
            for key in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
                result.pop(key, None)
            result["enum"] = list(range(low, high + 1))
    return result


def _bound(schema: Mapping[str, Any], inclusive: str, exclusive: str, step: int) -> int | None:
    """Return the tightest integer bound (`step` +1 for a lower bound, -1 for an upper one), or None."""
    candidates: list[int] = []
    value = schema.get(inclusive)
    exclusive_value = schema.get(exclusive)
    if _is_number(value):
        rounded = math.ceil(value) if step > 0 else math.floor(value)
        # Draft 4 spells exclusivity as a boolean beside the bound.
        candidates.append(rounded + step if exclusive_value is True and rounded == value else rounded)
    if _is_number(exclusive_value):
        rounded = math.floor(exclusive_value) if step > 0 else math.ceil(exclusive_value)
        candidates.append(rounded + step)
    if not candidates:
        return None
    return max(candidates) if step > 0 else min(candidates)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def unenforced_keywords(schema: Any) -> set[str]:
    """Return the constraint keywords in `schema` that decoding cannot enforce (post-validation catches them)."""
    found: set[str] = set()
    if isinstance(schema, list):
        for item in schema:
            found |= unenforced_keywords(item)
    elif isinstance(schema, dict):
        found |= UNENFORCED_KEYWORDS & {key for key, value in schema.items() if not isinstance(value, dict | list)}
        found |= {key for key in ("not", "if", "contains", "patternProperties") if key in schema}
        for key, value in schema.items():
            if key not in LITERAL_KEYWORDS:
                found |= unenforced_keywords(value)
    return found


@dataclass(frozen=True)
class TokenVocabulary:
    """A tokenizer's vocabulary in outlines-core's form, plus the ids of its single-character tokens."""

    vocabulary: Vocabulary
    eos_token_id: int
    single_char_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TokenVocabulary:
        """Map every ordinary token to the text it decodes to; special tokens other than eos are left out."""
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise SchemaError("constrained decoding needs a tokenizer with an eos token")
        special = set(tokenizer.all_special_ids)
        special |= {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
        by_text: dict[str, list[int]] = {}
        single: list[int] = []
        for token, token_id in tokenizer.get_vocab().items():
            if token_id in special:
                continue
            text = tokenizer.convert_tokens_to_string([token])
            if not text:
                continue
            by_text.setdefault(text, []).append(token_id)
            # U+FFFD stands for a partial UTF-8 byte: it decodes to other text, so it cannot spell a character.
            if len(text) == 1 and text != "\ufffd":
                single.append(token_id)
        return cls(Vocabulary(int(eos_id), by_text), int(eos_id), tuple(sorted(single)))


@dataclass
class CompiledGrammar:
    """A JSON schema compiled to a token automaton, with each state's distance to acceptance."""

    schema: JsonSchema
    index: Index
    vocab: TokenVocabulary
    distance: dict[int, int]
    max_distance: int
    compile_s: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def min_tokens(self) -> int:
        """Return the fewest tokens any valid output needs (the budget `max_tokens` must allow)."""
        return self.distance_of(self.index.get_initial_state())

    def next_state(self, state: int, token_id: int) -> int | None:
        """Return the automaton state after `token_id`, or None when it is not allowed."""
        result: int | None = self.index.get_next_state(state, token_id)
        return result

    def distance_of(self, state: int) -> int:
        """Return the fewest tokens from `state` to an accepting state."""
        known = self.distance.get(state)
        if known is not None:
            return known
        # Reached through a multi-character token into a state the single-character search did not visit.
        with self._lock:
            found = _distance_by_search(self.index, self.vocab.single_char_ids, state)
            self.distance[state] = found
        return found


def _single_char_graph(index: Index, single_char_ids: Sequence[int]) -> dict[int, list[int]]:
    start = index.get_initial_state()
    successors: dict[int, list[int]] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        state = queue.popleft()
        following: list[int] = []
        for token_id in single_char_ids:
            nxt = index.get_next_state(state, token_id)
            if nxt is None:
                continue
            following.append(nxt)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
        successors[state] = following
    return successors


def _distances_to_accept(index: Index, successors: Mapping[int, Iterable[int]]) -> dict[int, int]:
    predecessors: dict[int, list[int]] = {}
    for state, following in successors.items():
        for nxt in following:
            predecessors.setdefault(nxt, []).append(state)
    distance = {state: 0 for state in successors if index.is_final_state(state)}
    queue = deque(distance)
    while queue:
        state = queue.popleft()
        for previous in predecessors.get(state, ()):
            if previous not in distance:
                distance[previous] = distance[state] + 1
                queue.append(previous)
    return distance


def _distance_by_search(index: Index, single_char_ids: Sequence[int], start: int) -> int:
    queue = deque([(start, 0)])
    seen = {start}
    while queue:
        state, steps = queue.popleft()
        if index.is_final_state(state):
            return steps
        for token_id in single_char_ids:
            nxt = index.get_next_state(state, token_id)
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, steps + 1))
    # No completion is spellable with single characters; never let the tight mode pick this state.
    return 1 << 30


def compile_schema(schema: JsonSchema, vocab: TokenVocabulary) -> CompiledGrammar:
    """Compile a JSON schema into a token automaton for `vocab`, with distances to acceptance."""
    started = time.perf_counter()
    normalized = normalize_schema(schema)
    try:
        regex = build_regex_from_schema(json.dumps(normalized), WHITESPACE_PATTERN)
    except Exception as error:  # outlines-core raises plain ValueError/RuntimeError subclasses
        raise SchemaError(f"unsupported JSON schema: {error}") from error
    try:
        index = Index(regex, vocab.vocabulary)
    except Exception as error:
        raise SchemaError(f"the JSON schema cannot be compiled for this vocabulary: {error}") from error
    unenforced = unenforced_keywords(normalized)
    if unenforced:
        logger.warning(
            "JSON schema keywords %s are not enforced while decoding, only checked after", sorted(unenforced)
        )
    distance = _distances_to_accept(index, _single_char_graph(index, vocab.single_char_ids))
    reachable = [value for value in distance.values() if value < 1 << 30]
    grammar = CompiledGrammar(
        schema=dict(schema),
        index=index,
        vocab=vocab,
        distance=distance,
        max_distance=max(reachable, default=0),
        compile_s=time.perf_counter() - started,
    )
    logger.info("compiled JSON schema in %.2f s (min %d tokens)", grammar.compile_s, grammar.min_tokens)
    return grammar


class GrammarCache:
    """Compiled grammars for one tokenizer, least recently used first out."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_entries: int = 64) -> None:
        """Cache up to `max_entries` compiled schemas for `tokenizer`."""
        self._tokenizer = tokenizer
        self._max_entries = max_entries
        self._vocab: TokenVocabulary | None = None
        self._entries: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, schema: Mapping[str, Any]) -> CompiledGrammar:
        """Return the compiled grammar for `schema`, compiling it on first use."""
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        # One lock for compile too: two requests with a new schema should compile it once, not twice.
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                return cached
            if self._vocab is None:
                self._vocab = TokenVocabulary.from_tokenizer(self._tokenizer)
            grammar = compile_schema(dict(schema), self._vocab)
            self._entries[key] = grammar
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            return grammar


def _unpack_bitmask(bitmask: torch.Tensor, size: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(-1)[:size].bool()


class JsonConstraintProcessor(LogitsProcessor):
    """Masks logits so each row spells a document accepted by the grammar within `max_new_tokens` tokens.

    Stateful: make a new one for every `generate` call (rows are tracked from the first call on).
    """

    def __init__(self, grammar: CompiledGrammar, max_new_tokens: int) -> None:
        """Constrain a generation of at most `max_new_tokens` new tokens to `grammar`."""
        if max_new_tokens < grammar.min_tokens:
            raise SchemaError(
                f"max_tokens={max_new_tokens} is too small for this JSON schema: it needs at least "
                f"{grammar.min_tokens} tokens"
            )
        self.grammar = grammar
        self.max_new_tokens = max_new_tokens
        self._prompt_length: int | None = None
        self._guides: list[Guide] = []
        self._finished: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Advance each row's automaton by its last token and mask the logits for the next one."""
        rows, vocab_size = scores.shape
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
            self._guides = [Guide(self.grammar.index) for _ in range(rows)]
            self._finished = [False] * rows
        else:
            last = input_ids[:, -1].tolist()
            for row, token_id in enumerate(last):
                if self._finished[row]:
                    continue
                guide = self._guides[row]
                # Anything the automaton refuses can only be eos or padding after a row was stopped otherwise.
                if token_id == self.grammar.vocab.eos_token_id or not guide.accepts_tokens([token_id]):
                    self._finished[row] = True
                else:
                    guide.advance(token_id=token_id, return_tokens=False)
        remaining = self.max_new_tokens - (input_ids.shape[1] - self._prompt_length)
        allowed = torch.zeros(rows, vocab_size, dtype=torch.bool)
        bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
        for row in range(rows):
            if self._finished[row]:
                allowed[row] = True
                continue
            guide = self._guides[row]
            if remaining - 1 >= self.grammar.max_distance:
                guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
                allowed[row] = _unpack_bitmask(bitmask, vocab_size)
            else:
                for token_id in self._feasible_tokens(guide.get_state(), remaining, scores[row]):
                    if token_id < vocab_size:
                        allowed[row, token_id] = True
        result = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        return result  # type: ignore[return-value]

    def _feasible_tokens(self, state: int, remaining: int, row_scores: torch.Tensor) -> list[int]:
        grammar = self.grammar
        budget_after = remaining - 1
        feasible: list[int] = []
        if grammar.index.is_final_state(state):
            feasible.append(grammar.vocab.eos_token_id)
        for token_id in grammar.vocab.single_char_ids:
            nxt = grammar.next_state(state, token_id)
            if nxt is not None and grammar.distance_of(nxt) <= budget_after:
                feasible.append(token_id)
        # Longer tokens the model prefers, when they still leave room to finish, keep the text natural.
        count = min(TIGHT_CANDIDATES, row_scores.shape[0])
        for token_id in torch.topk(row_scores.float(), count).indices.tolist():
            nxt = grammar.next_state(state, token_id)
            if nxt is not None and grammar.distance_of(nxt) <= budget_after:
                feasible.append(token_id)
        return feasible
