"""Keeping the test split out of synthetic data and out of generator prompts.

Two checks, both over normalised word tokens (see `dedup.words`):

- n-gram overlap: a generated text that shares any `ngram`-token sequence (13 by default) with a test prompt or
  reference leaks it. Exact, through a set of 64-bit n-gram hashes.
- near duplicate: a generated text whose word 3-gram shingle Jaccard similarity to a test prompt or reference
  reaches `threshold` copies it. MinHash LSH finds the candidates; the Jaccard of the shingle sets decides.

A text shorter than `ngram` tokens can't share an n-gram with anything: the near-duplicate check is what catches
short copies of short test texts (and copies of any length with a few words changed). `leaks` and `scrub`, which
screen what goes into generator prompts (seeds, judge reasons), also treat a whole test text of `SHORT_SPAN_MIN` to
`ngram - 1` tokens as a span: a judge reason quoting a short reference would otherwise pass untouched.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from llamaduo.data.rows import ChatRow
from llamaduo_synthesizer.dedup import (
    GRAM_BASE,
    U32,
    U64,
    Signer,
    TextBatch,
    TokenHasher,
    chunks,
    fmix64,
    gram_hashes,
    lsh_bands,
    signatures,
)

LeakReason = Literal["test_ngram_overlap", "test_near_duplicate"]
TEST_NGRAM_OVERLAP: Final = "test_ngram_overlap"
TEST_NEAR_DUPLICATE: Final = "test_near_duplicate"
REDACTED: Final = "[…]"
GUARD_RECALL: Final = 0.999
"""Chance that a text exactly at the threshold is an LSH candidate: a leak costs more than a false candidate."""
SHORT_SPAN_MIN: Final = 4
"""Test texts shorter than `ngram` but at least this long count whole as one span in `leaks` and `scrub`."""

_WORD = re.compile(r"\w+")


class TestSetGuard:
    """Keeps the test split out of synthetic data and out of generator prompts."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(
        self, test_rows: Sequence[ChatRow], *, ngram: int = 13, threshold: float = 0.8, num_perm: int = 128
    ) -> None:
        self.ngram = ngram
        self.threshold = threshold
        self._hasher = TokenHasher()
        self._signer = Signer(num_perm, seed=1)
        texts = list(dict.fromkeys(text for row in test_rows for text in (row.prompt, row.reference)))
        batch = self._hasher.batch(texts)
        grams, _ = batch.grams(ngram)
        self._ngrams: set[int] = set(grams.tolist())
        # Whole short test texts, by length: what `leaks`/`scrub` look for where no n-gram can exist.
        self._short: dict[int, set[int]] = {}
        for tokens in batch.tokens:
            if SHORT_SPAN_MIN <= len(tokens) < ngram:
                self._short.setdefault(len(tokens), set()).update(gram_hashes(tokens, len(tokens)))
        shingles, counts = batch.shingles()
        _, sigs = signatures(batch, self._signer)
        # Item i of the LSH index is the i-th test text that has tokens: the same order as the signature rows.
        self._lsh = BandIndex(sigs, lsh_bands(threshold, num_perm, recall=GUARD_RECALL))
        offsets = (np.cumsum(counts) - counts).tolist()
        self._shingle_sets = [
            frozenset(shingles[start : start + count].tolist())
            for start, count in zip(offsets, counts.tolist(), strict=True)
            if count
        ]

    def check(self, instruction: str, response: str) -> LeakReason | None:
        """None when the generated pair is clean; else how it leaks the test split."""
        return self.check_many([(instruction, response)])[0]

    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[LeakReason | None]:
        """`check` for each (instruction, response) pair, featurised in batches (much faster than one by one)."""
        overlaps: list[bool] = []
        near: list[bool] = []
        for chunk in chunks(text for pair in pairs for text in pair):
            batch = self._hasher.batch(chunk)
            overlaps.extend(self._overlaps(batch))
            near.extend(self._near_duplicates(batch))
        results: list[LeakReason | None] = []
        # Texts alternate instruction, response: pair i owns texts 2i and 2i + 1.
        for index in range(0, len(overlaps), 2):
            if overlaps[index] or overlaps[index + 1]:
                results.append(TEST_NGRAM_OVERLAP)
            elif near[index] or near[index + 1]:
                results.append(TEST_NEAR_DUPLICATE)
            else:
                results.append(None)
        return results

    def leaks(self, text: str) -> bool:
        """True when `text` shares an n-gram with a test prompt or reference, contains a whole short one, or is a
        near copy of one (the check for texts shorter than the n-gram)."""
        batch = self._hasher.batch_tokens([[token for _, _, token in _token_spans(text)]])
        return bool(self._covered(batch).any()) or self._near_duplicates(batch)[0]

    def scrub(self, text: str) -> str:
        """`text` with every test n-gram span (and every whole short test text in it) replaced by "[…]".

        The text comes back NFKC-normalised (unchanged when it already is, as plain ASCII always is).
        """
        spans = _token_spans(text)
        covered = self._covered(self._hasher.batch_tokens([[token for _, _, token in spans]]))
        if not covered.any():
            return text
        source = unicodedata.normalize("NFKC", text)
        parts: list[str] = []
        position = 0
        hidden = covered.tolist()
        index = 0
        while index < len(spans):
            if not hidden[index]:
                index += 1
                continue
            # A run of covered tokens goes as one span, with whatever lies between its tokens.
            last = index
            while last + 1 < len(spans) and hidden[last + 1]:
                last += 1
            parts += [source[position : spans[index][0]], REDACTED]
            position = spans[last][1]
            index = last + 1
        parts.append(source[position:])
        return "".join(parts)

    def _overlaps(self, batch: TextBatch) -> list[bool]:
        grams, counts = batch.grams(self.ngram)
        values = grams.tolist()
        # One C-level set intersection per batch: almost always empty, so per-text work is rare.
        if self._ngrams.isdisjoint(values):
            return [False] * len(batch.tokens)
        ends = np.cumsum(counts).tolist()
        return [
            not self._ngrams.isdisjoint(values[end - count : end])
            for end, count in zip(ends, counts.tolist(), strict=True)
        ]

    def _near_duplicates(self, batch: TextBatch) -> list[bool]:
        rows, sigs = signatures(batch, self._signer)
        candidates = self._lsh.query(sigs)
        shingles, counts = batch.shingles()
        offsets = (np.cumsum(counts) - counts).tolist()
        return [
            row >= 0
            and bool(candidates[row])
            and self._jaccard_reaches(shingles[start : start + count], candidates[row])
            for row, start, count in zip(rows, offsets, counts.tolist(), strict=True)
        ]

    def _jaccard_reaches(self, shingles: U32, candidates: list[int]) -> bool:
        mine = frozenset(shingles.tolist())
        for candidate in candidates:
            theirs = self._shingle_sets[candidate]
            shared = len(mine & theirs)
            if shared >= self.threshold * (len(mine) + len(theirs) - shared):
                return True
        return False

    def _covered(self, batch: TextBatch) -> npt.NDArray[np.bool_]:
        """Which tokens of the batch's single text lie inside a test n-gram or a whole short test text."""
        covered = np.zeros(len(batch.hashes), dtype=bool)
        for length, table in [(self.ngram, self._ngrams), *self._short.items()]:
            grams, _ = batch.grams(length)
            for start, value in enumerate(grams.tolist()):
                if value in table:
                    covered[start : start + length] = True
        return covered


class BandIndex:
    """A fixed MinHash LSH index queried a whole batch at a time.

    Each band of `rows` hash values is folded into one 64-bit key, so a batch of signatures is matched against
    every band of every indexed item with one `numpy.isin`; only the (rare) hits reach Python. The test split is
    small and fixed, so this beats a `MinHashLSH` query per generated text by an order of magnitude.
    """

    def __init__(self, signatures: U32, params: tuple[int, int]) -> None:
        self.bands, self.rows = params
        keys = self._keys(signatures)
        self._items: dict[int, list[int]] = {}
        for item, item_keys in enumerate(keys.tolist()):
            for key in item_keys:
                self._items.setdefault(key, []).append(item)
        self._known = np.unique(keys)

    def query(self, signatures: U32) -> list[list[int]]:
        """For each signature, the indexed items that share at least one band with it (ascending)."""
        keys = self._keys(signatures)
        if not len(self._known):
            return [[] for _ in range(len(signatures))]
        # Binary search in the sorted known keys: no hashing or sorting of the batch, unlike numpy.isin.
        at = np.minimum(np.searchsorted(self._known, keys), len(self._known) - 1)
        hits = self._known[at] == keys
        found: list[list[int]] = [[] for _ in range(len(signatures))]
        for row in np.flatnonzero(hits.any(axis=1)).tolist():
            items: set[int] = set()
            for key in keys[row][hits[row]].tolist():
                items.update(self._items[key])
            found[row] = sorted(items)
        return found

    def _keys(self, signatures: U32) -> U64:
        blocks = signatures[:, : self.bands * self.rows].astype(np.uint64).reshape(-1, self.bands, self.rows)
        keys = np.zeros(blocks.shape[:2], dtype=np.uint64)
        for column in range(self.rows):
            keys = keys * GRAM_BASE + blocks[:, :, column]
        # Salted with the band number: equal values in two different bands are different keys.
        return fmix64(keys ^ np.arange(self.bands, dtype=np.uint64))


def _token_spans(text: str) -> list[tuple[int, int, str]]:
    """Normalised tokens of `text` with their character spans in its NFKC form.

    The tokens are exactly `dedup.words(text)`: casefolding is per character, and where it turns one character
    into a letter plus a combining mark (U+0130) the run splits there, as it does on the whole casefolded text.
    """
    source = unicodedata.normalize("NFKC", text)
    spans: list[tuple[int, int, str]] = []
    for match in _WORD.finditer(source):
        for token in _WORD.findall(match.group().casefold()):
            spans.append((match.start(), match.end(), token))
    return spans


__all__ = ["REDACTED", "TEST_NEAR_DUPLICATE", "TEST_NGRAM_OVERLAP", "LeakReason", "TestSetGuard"]
