"""Dedup and decontamination of synthetic rows at the paper's scale: 256K generated rows with planted exact
duplicates, near duplicates and test leaks, streamed through `TestSetGuard.check_many` and then
`NearDuplicateIndex.add_many` in chunks, the way the synthesizer will. Prints wall time, peak memory and
precision/recall per planted kind; then the same at 64K (growth should be close to linear); then the reference's
way (MinHash per row in pure-Python datasketch, both members of every duplicate pair dropped, then an O(N²) list
membership filter) against ours on the same 16K rows.

    make bench-synth        (or: .venv/bin/python -m tests.bench.synth_dedup --rows 65536 --small 16384)
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from datasketch import MinHash, MinHashLSH

from llamaduo.data.rows import ChatRow, make_row
from llamaduo_synthesizer.decontamination import TestSetGuard
from llamaduo_synthesizer.dedup import NearDuplicateIndex, rouge_l_f1

CHUNK = 1024  # rows per guard/index call: what one wave of generator replies gives the synthesizer
RESERVOIR = 4096  # earlier kept rows that planted duplicates copy from
# Share of each planted kind among generated rows; the rest are fresh rows.
PLANTED = {"exact": 0.04, "near": 0.05, "leak": 0.02, "test_copy": 0.005}
EXPECTED = {
    "exact": "exact_duplicate",
    "near": "near_duplicate",
    "leak": "test_ngram_overlap",
    # A copy of a test prompt of at most 12 tokens plus one word shares no 13-gram: only the MinHash check sees it.
    "test_copy": "test_near_duplicate",
}
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
FUNCTION_WORDS = ["the", "a", "of", "to", "and", "in", "is", "that", "for", "it", "with", "as", "on", "by", "this"]
THRESHOLD = 0.9
T = TypeVar("T")


def vocabulary(size: int = 6000) -> list[str]:
    """Distinct pseudo-words, plus function words weighted to a quarter of all draws (like English text)."""
    rng = random.Random("vocabulary")
    content: set[str] = set()
    while len(content) < size:
        content.add("".join(rng.choices(SYLLABLES, k=rng.randint(2, 4))))
    return sorted(content) + FUNCTION_WORDS * (size // (3 * len(FUNCTION_WORDS)))


WORDS = vocabulary()


def render(tokens: list[str], rng: random.Random) -> str:
    """Tokens as sentences: capitalised, comma here and there, full stops (normalisation must see through it)."""
    out: list[str] = []
    start = 0
    while start < len(tokens):
        end = min(len(tokens), start + rng.randint(5, 12))
        sentence = tokens[start:end]
        out.append(" ".join([sentence[0].capitalize(), *sentence[1:]]) + ("." if rng.random() < 0.8 else "!"))
        start = end
    return " ".join(out)


def shingles(tokens: list[str]) -> set[tuple[str, ...]]:
    """Word 3-gram shingles, as the index defines them (for planting near duplicates that really are)."""
    return {tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)}


def jaccard(a: list[str], b: list[str]) -> float:
    """Exact Jaccard similarity of the 3-gram shingle sets."""
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


@dataclass
class Row:
    """One generated pair and what was planted in it."""

    kind: str
    instruction: str
    response: str


@dataclass
class Workload:
    """A deterministic stream of rows with planted duplicates and leaks against `test_rows`."""

    seed: int = 0
    test_size: int = 1000
    test_rows: list[ChatRow] = field(init=False)
    near_jaccard: list[float] = field(default_factory=list)
    near_rouge: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(f"test:{self.seed}")
        self._test_tokens = [(self._fresh(rng, 6, 24), self._fresh(rng, 20, 60)) for _ in range(self.test_size)]
        self.test_rows = [
            make_row(render(prompt, rng), render(reference, rng), origin="coverage")
            for prompt, reference in self._test_tokens
        ]
        self._short_prompts = [prompt for prompt, _ in self._test_tokens if len(prompt) <= 12]

    @staticmethod
    def _fresh(rng: random.Random, low: int, high: int) -> list[str]:
        return rng.choices(WORDS, k=rng.randint(low, high))

    def chunks(self, rows: int, kept: list[list[str]]) -> Iterator[list[tuple[Row, list[str] | None]]]:
        """Chunks of rows; a fresh row carries its response tokens, to be put in `kept` by the caller if kept.

        Planted copies are only made of rows that the caller reported kept, as the synthesizer keeps them.
        """
        rng = random.Random(f"rows:{self.seed}")
        kinds, weights = [*PLANTED, "fresh"], [*PLANTED.values(), 1.0 - sum(PLANTED.values())]
        for start in range(0, rows, CHUNK):
            chunk: list[tuple[Row, list[str] | None]] = []
            for kind in rng.choices(kinds, weights, k=min(CHUNK, rows - start)):
                if kind in ("exact", "near") and not kept:
                    kind = "fresh"
                chunk.append(self._row(kind, rng, kept))
            yield chunk

    def _row(self, kind: str, rng: random.Random, kept: list[list[str]]) -> tuple[Row, list[str] | None]:
        instruction = self._fresh(rng, 8, 20)
        if kind == "fresh":
            response = self._fresh(rng, 20, 60)
            return Row(kind, render(instruction, rng), render(response, rng)), response
        if kind == "exact":
            # Same words, other sentence breaks, case and punctuation: equal once normalised.
            return Row(kind, render(instruction, rng), render(rng.choice(kept), rng).upper()), None
        if kind == "near":
            return Row(kind, render(instruction, rng), render(self._near_copy(rng.choice(kept), rng), rng)), None
        if kind == "leak":
            prompt, reference = rng.choice(self._test_tokens)
            source = prompt if len(prompt) >= 13 and rng.random() < 0.5 else reference
            length = rng.randint(13, min(20, len(source)))
            at = rng.randint(0, len(source) - length)
            span = source[at : at + length]
            host = instruction if rng.random() < 0.5 else self._fresh(rng, 20, 40)
            cut = rng.randint(0, len(host))
            leaked = host[:cut] + span + host[cut:]
            if host is instruction:
                return Row(kind, render(leaked, rng), render(self._fresh(rng, 20, 60), rng)), None
            return Row(kind, render(instruction, rng), render(leaked, rng)), None
        # A short test prompt with one word added: too short for a 13-gram, Jaccard (n-2)/(n-1) >= 0.8.
        copy = [*rng.choice(self._short_prompts), rng.choice(WORDS)]
        return Row(kind, render(copy, rng), render(self._fresh(rng, 20, 60), rng)), None

    def _near_copy(self, tokens: list[str], rng: random.Random) -> list[str]:
        """A few word edits whose 3-gram Jaccard to `tokens` stays >= 0.9 (edits near the ends mostly do)."""
        for _ in range(30):
            edited = list(tokens)
            for _ in range(rng.randint(1, 3)):
                op = rng.choice(("substitute", "insert", "delete"))
                position = rng.choice((0, 1, len(edited) - 1, len(edited) - 2, rng.randrange(len(edited))))
                if op == "substitute":
                    edited[position] = rng.choice(WORDS)
                elif op == "insert":
                    edited.insert(position, rng.choice(WORDS))
                elif len(edited) > 10:
                    del edited[position]
            if edited != tokens and jaccard(tokens, edited) >= THRESHOLD:
                break
        else:
            edited = [*tokens, rng.choice(WORDS)]
        self.near_jaccard.append(jaccard(tokens, edited))
        self.near_rouge.append(rouge_l_f1(tokens, edited))
        return edited


@dataclass
class Outcome:
    """What one streamed run did."""

    rows: int
    seconds: float
    guard_seconds: float
    wall_seconds: float
    kept: int
    planted: Counter[str]
    flagged: Counter[tuple[str, str]]
    candidates: int
    near_jaccard: tuple[float, float]
    near_rouge_min: float
    peak_mb: float

    def report(self) -> None:
        """Print time, memory and precision/recall per planted kind."""
        print(
            f"  {self.rows:,} rows: dedup+decontamination {self.seconds:.1f} s "
            f"({self.rows / self.seconds:,.0f} rows/s; {self.wall_seconds:.1f} s with generating the rows), "
            f"peak RSS {self.peak_mb:,.0f} MB"
        )
        print(f"  of which guard {self.guard_seconds:.1f} s, index {self.seconds - self.guard_seconds:.1f} s")
        print(f"  kept {self.kept:,}; LSH candidates confirmed with ROUGE-L: {self.candidates:,}")
        for kind, expected in EXPECTED.items():
            planted = self.planted[kind]
            hits = self.flagged[kind, expected]
            flagged = sum(count for (_, reason), count in self.flagged.items() if reason == expected)
            precision = hits / flagged if flagged else 1.0
            recall = hits / planted if planted else 1.0
            print(f"  {kind:>9}: planted {planted:6,}  precision {precision:.4f}  recall {recall:.4f}")
        wrong = {key: count for key, count in self.flagged.items() if key[1] != EXPECTED.get(key[0])}
        if wrong:
            print(f"  dropped for another reason than planted (kind, reason): {wrong}")
        low, mean = self.near_jaccard
        print(
            f"  planted near duplicates: 3-gram Jaccard min {low:.3f} mean {mean:.3f}; "
            f"ROUGE-L min {self.near_rouge_min:.3f}"
        )


def stream(rows: int, num_perm: int | None, per_row: bool) -> Outcome:
    """Generate `rows` rows and run them through the guard and the index as the synthesizer will."""
    workload = Workload()
    guard = TestSetGuard(workload.test_rows)
    index = NearDuplicateIndex(threshold=THRESHOLD, **({"num_perm": num_perm} if num_perm else {}))
    kept: list[list[str]] = []
    planted: Counter[str] = Counter()
    flagged: Counter[tuple[str, str]] = Counter()
    reservoir = random.Random("reservoir")
    fresh_kept = 0
    spent = guard_spent = 0.0
    began = time.perf_counter()
    for chunk in workload.chunks(rows, kept):
        started = time.perf_counter()
        if per_row:
            leaks = [guard.check(row.instruction, row.response) for row, _ in chunk]
        else:
            leaks = guard.check_many([(row.instruction, row.response) for row, _ in chunk])
        clean = [row.response for (row, _), leak in zip(chunk, leaks, strict=True) if leak is None]
        checked = time.perf_counter()
        duplicates = iter([index.add(text) for text in clean] if per_row else index.add_many(clean))
        guard_spent += checked - started
        spent += time.perf_counter() - started
        for (row, tokens), leak in zip(chunk, leaks, strict=True):
            planted[row.kind] += 1
            reason: str | None = leak or next(duplicates)
            if reason is not None:
                flagged[row.kind, reason] += 1
            elif tokens is not None:
                # Reservoir sampling: planted copies come from anywhere earlier in the stream, not just the end.
                if len(kept) < RESERVOIR:
                    kept.append(tokens)
                elif (slot := reservoir.randrange(fresh_kept + 1)) < RESERVOIR:
                    kept[slot] = tokens
                fresh_kept += 1
    outcome = Outcome(
        rows=rows,
        seconds=spent,
        guard_seconds=guard_spent,
        wall_seconds=time.perf_counter() - began,
        kept=len(index),
        planted=planted,
        flagged=flagged,
        candidates=index.candidates_checked,
        near_jaccard=(min(workload.near_jaccard), sum(workload.near_jaccard) / len(workload.near_jaccard)),
        near_rouge_min=min(workload.near_rouge),
        peak_mb=peak_mb(),
    )
    return outcome


# ----------------------------------------------------------------------------------------------------------------
# The reference's way, rebuilt from its description: a MinHash of the response's whitespace words per row
# (pure-Python datasketch), MinHashLSH at the threshold, every candidate pair over the ROUGE-L threshold
# (a Python LCS table, as rouge_score computes it) marks BOTH rows duplicate, and the survivors are then found
# by list membership: `example["messages"] in filtered_messages` for every row, O(N²).
# ----------------------------------------------------------------------------------------------------------------


def _lcs_table_f1(a: list[str], b: list[str]) -> float:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, token in enumerate(a):
        for j, other in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if token == other else max(table[i][j + 1], table[i + 1][j])
    return 2.0 * table[-1][-1] / (len(a) + len(b))


def reference_dedup(messages: list[list[dict[str, str]]]) -> tuple[int, float, float]:
    """Rows kept by the reference's way, and its seconds for (MinHash + LSH + ROUGE-L, list filter)."""
    started = time.perf_counter()
    responses = [message[-1]["content"] for message in messages]
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    minhashes = []
    for index, response in enumerate(responses):
        minhash = MinHash(num_perm=128)
        for word in response.split():
            minhash.update(word.encode("utf8"))
        lsh.insert(index, minhash)
        minhashes.append(minhash)
    duplicates: set[int] = set()
    for index, minhash in enumerate(minhashes):
        for other in lsh.query(minhash):
            if other != index:
                score = _lcs_table_f1(responses[index].lower().split(), responses[other].lower().split())
                if score > THRESHOLD:
                    duplicates.add(other)
    near_seconds = time.perf_counter() - started
    started = time.perf_counter()
    filtered = [message for index, message in enumerate(messages) if index not in duplicates]
    kept = [message for message in messages if message in filtered]
    return len(kept), near_seconds, time.perf_counter() - started


def compare_with_reference(rows: int, num_perm: int | None) -> None:
    """The reference's way and ours on the same `rows` generated rows (dedup only: it had no decontamination)."""
    workload = Workload()
    kept_tokens: list[list[str]] = []
    generated: list[Row] = []
    for chunk in workload.chunks(rows, kept_tokens):
        for row, tokens in chunk:
            generated.append(row)
            if tokens is not None and len(kept_tokens) < RESERVOIR:
                kept_tokens.append(tokens)
    messages = [
        [{"content": row.instruction, "role": "user"}, {"content": row.response, "role": "assistant"}]
        for row in generated
    ]
    started = time.perf_counter()
    index = NearDuplicateIndex(threshold=THRESHOLD, **({"num_perm": num_perm} if num_perm else {}))
    ours = index.add_many(row.response for row in generated)
    ours_seconds = time.perf_counter() - started
    reference_kept, near_seconds, filter_seconds = reference_dedup(messages)
    reference_seconds = near_seconds + filter_seconds
    ours_kept = sum(reason is None for reason in ours)
    planted = sum(row.kind in ("exact", "near") for row in generated)
    print(
        f"  {rows:,} rows ({planted:,} planted exact or near copies): reference {reference_seconds:.1f} s "
        f"(MinHash+LSH+ROUGE-L {near_seconds:.1f} s, O(N²) list filter {filter_seconds:.1f} s), kept {reference_kept:,}"
    )
    print(
        f"  {rows:,} rows: ours {ours_seconds:.2f} s (dedup only: the reference had no decontamination), "
        f"kept {ours_kept:,}"
    )
    print(
        "  (the reference compares raw whitespace words, so case and punctuation hide most copies from it, and it "
        "drops both members of each pair it does find)"
    )
    print(f"  speed-up: {reference_seconds / ours_seconds:.1f}x")


def isolated(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in a fresh interpreter: a clean heap, and a peak RSS of its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def peak_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Run the three comparisons and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256 * 1024)
    parser.add_argument("--small", type=int, default=64 * 1024, help="the second run, for the growth ratio")
    parser.add_argument("--reference-rows", type=int, default=16 * 1024)
    parser.add_argument("--num-perm", type=int, default=None, help="MinHash size of the index (its default if unset)")
    parser.add_argument("--per-row", action="store_true", help="call check/add once per row instead of in chunks")
    args = parser.parse_args()
    mode = "one call per row" if args.per_row else f"chunks of {CHUNK} rows"
    print(f"Dedup + decontamination against a 1,000-row test split, streamed in {mode}, each run in a fresh process:")
    big = isolated(stream, args.rows, args.num_perm, args.per_row)
    big.report()
    print("The same at the smaller size:")
    small = isolated(stream, args.small, args.num_perm, args.per_row)
    small.report()
    print(f"  time ratio {args.rows:,} / {args.small:,} rows: {big.seconds / small.seconds:.2f}")
    print("Against the reference's way:")
    isolated(compare_with_reference, args.reference_rows, args.num_perm)


if __name__ == "__main__":
    main()
