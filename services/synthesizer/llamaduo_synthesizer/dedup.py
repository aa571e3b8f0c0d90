"""Duplicate detection for synthetic rows: exact hashes first, then MinHash LSH candidates confirmed by ROUGE-L.

Texts are compared as normalised word tokens (Unicode NFKC, casefolded, `\\w+` runs). MinHash signatures are
computed for a whole batch of texts at once with numpy, using datasketch's permutation parameters and its
"affine32" scheme, so they are the signatures `datasketch.MinHash(hashfunc=...)` would give for the same shingle
hashes (a test checks it) and `datasketch.MinHashLSH` indexes them as usual.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from datasketch import LeanMinHash, MinHash, MinHashLSH

DuplicateReason = Literal["exact_duplicate", "near_duplicate"]
EXACT_DUPLICATE: Final = "exact_duplicate"
NEAR_DUPLICATE: Final = "near_duplicate"
SHINGLE: Final = 3
"""Word n-gram length of the MinHash shingles; texts with fewer tokens are shingled as unigrams."""
BATCH: Final = 1024
"""Texts featurised per numpy pass: bounds temporary memory, amortises per-call overhead."""
LSH_RECALL: Final = 0.99
"""Chance that a pair exactly at the threshold becomes an LSH candidate (the exact confirmation removes the rest)."""

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]

_WORD = re.compile(r"\w+")
_SCHEME: Final = "affine32"
_MAX_CACHED_TOKENS: Final = 1 << 18
# Multiplier of the polynomial that combines token hashes into an n-gram hash (odd, so it is a bijection mod 2^64).
GRAM_BASE = np.uint64(0x9E3779B97F4A7C15)
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def words(text: str) -> list[str]:
    """The normalised word tokens of `text`: NFKC, casefolded, runs of `\\w`."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


# The synthesizer screens a response with the guard, then offers the same string to the index: remembering the
# last few thousand tokenisations (one chunk of each) saves a third of all normalising. Callers don't mutate them.
_recent_words = functools.lru_cache(maxsize=4 * BATCH)(words)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel, Hyyrö 2004)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    # One bit per position of the longer sequence: each token of the shorter one costs a few big-int operations,
    # so the work is O(len(a) * len(b) / 64) machine words instead of a Python-level DP table.
    masks: dict[str, int] = {}
    for position, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << position)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        match = masks.get(token)
        if match is not None:
            u = v & match
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_f1(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences: 2·LCS / (len(a) + len(b))."""
    if not a or not b:
        return float(not a and not b)
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def lsh_bands(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """LSH `(bands, rows)` using at most `num_perm` hash values that catch a pair at `threshold` with `recall`.

    The widest band that still reaches `recall` wins: wider bands mean fewer false candidates and fewer band
    tables (memory). datasketch's own optimum balances false positives against false negatives and only catches
    about a third of the pairs exactly at the threshold; here a candidate is always confirmed exactly afterwards,
    so recall is what the bands are for.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be at least 2, got {num_perm}")
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def fmix64(values: U64) -> U64:
    """MurmurHash3's 64-bit finaliser, element-wise (wrapping arithmetic is the point)."""
    shift, m1, m2 = _FMIX64
    values = values ^ (values >> shift)
    values = values * m1
    values = values ^ (values >> shift)
    values = values * m2
    return values ^ (values >> shift)


def fmix32(values: U32) -> U32:
    """MurmurHash3's 32-bit finaliser: datasketch's pre-mix of every input hash in the affine schemes."""
    s1, m1, s2, m2 = _FMIX32
    values = values ^ (values >> s1)
    values = values * m1
    values = values ^ (values >> s2)
    values = values * m2
    return values ^ (values >> s1)


def token_hash(token: str) -> int:
    """Deterministic 64-bit hash of one token (the same in every process, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


def gram_hashes(tokens: Sequence[str], n: int) -> list[int]:
    """The 64-bit hashes of the word n-grams of one token sequence, as `TextBatch.grams` computes them."""
    values = np.fromiter(map(token_hash, tokens), dtype=np.uint64, count=len(tokens))
    grams, _ = _grams(values, np.array([len(tokens)], dtype=np.int64), n, short_as_unigrams=False)
    hashes: list[int] = grams.tolist()
    return hashes


@dataclass(frozen=True)
class TextBatch:
    """Normalised tokens of a batch of texts and their 64-bit token hashes laid end to end."""

    tokens: list[list[str]]
    hashes: U64
    lengths: I64

    def grams(self, n: int, *, short_as_unigrams: bool = False) -> tuple[U64, I64]:
        """Hashes of every word n-gram, text after text, and how many each text has.

        With `short_as_unigrams`, a text shorter than `n` contributes its unigrams instead of nothing.
        """
        return _grams(self.hashes, self.lengths, n, short_as_unigrams=short_as_unigrams)

    def shingles(self) -> tuple[U32, I64]:
        """32-bit shingle hashes (word 3-grams, unigrams for shorter texts) and how many each text has.

        These are the values a `datasketch.MinHash` `hashfunc` would return for each shingle.
        """
        grams, counts = self.grams(SHINGLE, short_as_unigrams=True)
        return (grams >> np.uint64(32)).astype(np.uint32), counts


def _grams(hashes: U64, lengths: I64, n: int, *, short_as_unigrams: bool) -> tuple[U64, I64]:
    total = len(hashes)
    counts = np.maximum(lengths - n + 1, 0)
    if short_as_unigrams:
        counts = np.where(lengths >= n, counts, lengths)
    if total == 0 or not counts.any():
        return np.empty(0, dtype=np.uint64), counts
    padded = np.concatenate([hashes, np.zeros(n - 1, dtype=np.uint64)])
    combined = hashes.copy()
    for offset in range(1, n):
        combined = combined * GRAM_BASE + padded[offset : offset + total]
    combined = fmix64(combined)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    ends = np.cumsum(lengths)[owner]
    span = np.full(total, n, dtype=np.int64)
    if short_as_unigrams:
        short = (lengths < n)[owner]
        span[short] = 1
        # A unigram is hashed on its own, so it can't collide with an n-gram that starts with the same token.
        combined = np.where(short, fmix64(hashes ^ GRAM_BASE), combined)
    keep = np.arange(total) + span <= ends
    return combined[keep], counts


class TokenHasher:
    """Featurises batches of texts; remembers the hashes of frequent tokens (bounded)."""

    def __init__(self, max_cached: int = _MAX_CACHED_TOKENS) -> None:
        self._cache: dict[str, int] = {}
        self._max_cached = max_cached

    def batch(self, texts: Iterable[str]) -> TextBatch:
        """Normalised tokens and token hashes of `texts`."""
        return self.batch_tokens([_recent_words(text) for text in texts])

    def batch_tokens(self, tokens: list[list[str]]) -> TextBatch:
        """Token hashes of texts already split into normalised tokens."""
        flat = list(itertools.chain.from_iterable(tokens))
        cache = self._cache
        missing = [token for token in set(flat) if token not in cache]
        if len(cache) + len(missing) > self._max_cached:
            # Wholesale reset keeps the bound without LRU bookkeeping on the hot path; hashes don't depend on it.
            cache.clear()
            missing = list(set(flat))
        for token in missing:
            cache[token] = token_hash(token)
        hashes = np.fromiter(map(cache.__getitem__, flat), dtype=np.uint64, count=len(flat))
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        return TextBatch(tokens=tokens, hashes=hashes, lengths=lengths)


class Signer:
    """MinHash signatures of many shingle sets at once: datasketch's permutations, applied with numpy."""

    CHUNK: Final = 1 << 15
    """Shingles permuted per numpy pass: a (CHUNK, num_perm) uint32 temporary."""

    def __init__(self, num_perm: int, seed: int) -> None:
        self.num_perm = num_perm
        self.seed = seed
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
        self._a: U32 = np.asarray(a, dtype=np.uint32)
        self._b: U32 = np.asarray(b, dtype=np.uint32)

    def sign(self, shingles: U32, counts: I64) -> U32:
        """One signature row per text with at least one shingle, in order (texts with none get no row)."""
        counts = counts[counts > 0]
        out = np.empty((len(counts), self.num_perm), dtype=np.uint32)
        if not len(counts):
            return out
        mixed = fmix32(shingles)
        ends = np.cumsum(counts)
        starts = ends - counts
        first = 0
        while first < len(counts):
            # Texts [first, last) whose shingles fit one chunk (at least one text, however long).
            last = max(first + 1, int(np.searchsorted(ends, starts[first] + self.CHUNK, side="right")))
            low, high = starts[first], ends[last - 1]
            permuted = mixed[low:high, None] * self._a + self._b
            out[first:last] = np.minimum.reduceat(permuted, starts[first:last] - low, axis=0)
            first = last
        return out

    def lean(self, signature: U32) -> LeanMinHash:
        """A datasketch `LeanMinHash` holding `signature`."""
        return LeanMinHash(seed=self.seed, hashvalues=signature, scheme=_SCHEME)


def signatures(batch: TextBatch, signer: Signer) -> tuple[list[int], U32]:
    """For each text of `batch`, its row in the returned signature array, or -1 when it has no tokens."""
    shingles, counts = batch.shingles()
    rows = np.cumsum(counts > 0) - 1
    return np.where(counts > 0, rows, -1).tolist(), signer.sign(shingles, counts)


def chunks(texts: Iterable[str], size: int = BATCH) -> Iterator[list[str]]:
    """`texts` in lists of at most `size`."""
    iterator = iter(texts)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class NearDuplicateIndex:
    """Exact, then near-duplicate detection over a growing set of texts (MinHash LSH + ROUGE-L confirmation).

    The first text of a cluster is kept and indexed; later ones are reported and left out of the index. A text
    is a near duplicate of an indexed one when MinHash LSH over word 3-gram shingles makes it a candidate and the
    ROUGE-L F1 of the two token sequences reaches `rouge_threshold`. The LSH bands are chosen (`lsh_bands`) so
    that a pair at Jaccard `threshold` is a candidate with probability 0.99; higher similarities more surely.

    64 permutations by default: the signatures only feed the LSH (the confirmation is exact), and against 128 they
    measured 20% faster and 25% leaner at 256K rows with the same recall (9 bands of 7 instead of 12 of 10).
    """

    def __init__(
        self, *, threshold: float = 0.9, num_perm: int = 64, rouge_threshold: float | None = None, seed: int = 1
    ) -> None:
        self.threshold = threshold
        self.rouge_threshold = threshold if rouge_threshold is None else rouge_threshold
        self.bands = lsh_bands(threshold, num_perm)
        self._hasher = TokenHasher()
        self._signer = Signer(num_perm, seed)
        self._lsh = MinHashLSH(num_perm=num_perm, params=self.bands)
        self._exact: set[bytes] = set()
        # Normalised tokens joined by spaces, by LSH key: kept for the ROUGE-L confirmation (tokens have no spaces).
        self._texts: list[str] = []
        self.candidates_checked = 0
        """LSH candidates compared with ROUGE-L so far (a measure of how selective the bands are)."""

    def __len__(self) -> int:
        """Distinct texts indexed."""
        return len(self._exact)

    def add(self, text: str) -> DuplicateReason | None:
        """None when `text` is new (it is now indexed); else why it is dropped."""
        return self._index([text], judge=True)[0]

    def add_many(self, texts: Iterable[str]) -> list[DuplicateReason | None]:
        """`add` for each text in order, featurised in batches (much faster than one `add` per text)."""
        results: list[DuplicateReason | None] = []
        for chunk in chunks(texts):
            results.extend(self._index(chunk, judge=True))
        return results

    def extend(self, texts: Iterable[str]) -> None:
        """Index existing texts (the training set so far) without judging them; exact repeats are indexed once."""
        for chunk in chunks(texts):
            self._index(chunk, judge=False)

    def is_near_duplicate(self, tokens: Sequence[str], other: Sequence[str]) -> bool:
        """The confirmation step: ROUGE-L F1 of two token sequences reaches `rouge_threshold`."""
        shorter, longer = sorted((len(tokens), len(other)))
        # F1 can't exceed 2·shorter / (shorter + longer): skip the LCS when lengths alone rule it out.
        if 2.0 * shorter < self.rouge_threshold * (shorter + longer):
            return False
        return rouge_l_f1(tokens, other) >= self.rouge_threshold

    def _index(self, texts: Sequence[str], *, judge: bool) -> list[DuplicateReason | None]:
        batch = self._hasher.batch(texts)
        rows, sigs = signatures(batch, self._signer)
        results: list[DuplicateReason | None] = []
        for tokens, row in zip(batch.tokens, rows, strict=True):
            joined = " ".join(tokens)
            key = hashlib.blake2b(joined.encode(), digest_size=16).digest()
            if key in self._exact:
                results.append(EXACT_DUPLICATE)
                continue
            minhash = self._signer.lean(sigs[row]) if row >= 0 else None
            if judge and minhash is not None and self._confirmed(minhash, tokens):
                results.append(NEAR_DUPLICATE)
                continue
            self._exact.add(key)
            if minhash is not None:
                self._lsh.insert(len(self._texts), minhash, check_duplication=False)
                self._texts.append(joined)
            results.append(None)
        return results

    def _confirmed(self, minhash: LeanMinHash, tokens: list[str]) -> bool:
        for candidate in self._lsh.query(minhash):
            self.candidates_checked += 1
            if self.is_near_duplicate(tokens, self._texts[candidate].split(" ")):
                return True
        return False


__all__ = [
    "EXACT_DUPLICATE",
    "NEAR_DUPLICATE",
    "DuplicateReason",
    "NearDuplicateIndex",
    "Signer",
    "TextBatch",
    "TokenHasher",
    "chunks",
    "fmix32",
    "fmix64",
    "gram_hashes",
    "lcs_length",
    "lsh_bands",
    "rouge_l_f1",
    "signatures",
    "token_hash",
    "words",
]
