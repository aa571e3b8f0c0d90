"""Near-duplicate detection: one survivor per cluster, ROUGE-L confirmation, datasketch compatibility, determinism."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from datasketch import MinHash
from hypothesis import given
from hypothesis import strategies as st

from llamaduo_synthesizer.dedup import (
    NearDuplicateIndex,
    Signer,
    TokenHasher,
    lcs_length,
    lsh_bands,
    rouge_l_f1,
    signatures,
    words,
)

WORDS = [f"w{i}" for i in range(500)]


def sentence(seed: int, length: int = 40) -> list[str]:
    """`length` words drawn from a 500-word vocabulary: unrelated seeds give unrelated texts."""
    return random.Random(seed).choices(WORDS, k=length)


def text(tokens: list[str]) -> str:
    return " ".join(tokens)


def fullwidth(ascii_letters: str) -> str:
    """The same letters in their full-width forms (U+FF21...), which NFKC folds back."""
    return "".join(chr(ord(letter) + 0xFEE0) for letter in ascii_letters)


def lcs_table(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_words_normalise_unicode_case_and_punctuation() -> None:
    assert words(f"{fullwidth('Hello')}, WORLD!  It's\tfine") == ["hello", "world", "it", "s", "fine"]
    assert words("STRASSE") == words("Straße")


@given(st.lists(st.sampled_from("abcd"), max_size=40), st.lists(st.sampled_from("abcd"), max_size=40))
def test_bit_parallel_lcs_matches_the_dynamic_programme(a: list[str], b: list[str]) -> None:
    assert lcs_length(a, b) == lcs_table(a, b)


def test_rouge_l_f1() -> None:
    assert rouge_l_f1(["a", "b", "c", "d"], ["a", "c", "d"]) == pytest.approx(2 * 3 / 7)
    assert rouge_l_f1([], []) == 1.0
    assert rouge_l_f1(["a"], []) == 0.0


def test_exact_duplicates_keep_the_first_and_see_through_case_and_punctuation() -> None:
    index = NearDuplicateIndex()
    base = text(sentence(1))
    assert index.add(base) is None
    assert index.add(base.upper() + "!") == "exact_duplicate"
    assert index.add("  " + base.replace(" ", ",  ") + ".") == "exact_duplicate"
    assert len(index) == 1


def test_near_duplicates_keep_the_first_and_drop_the_rest() -> None:
    index = NearDuplicateIndex()
    base = sentence(2)
    appended = [*base, "w7"]
    last_changed = [*base[:-1], "w8" if base[-1] != "w8" else "w9"]
    assert index.add(text(base)) is None
    assert index.add(text(appended)) == "near_duplicate"
    assert index.add(text(last_changed)) == "near_duplicate"
    # The dropped rows were not indexed: the same text again is still a near duplicate of the first, not exact.
    assert index.add(text(appended)) == "near_duplicate"
    assert len(index) == 1


def test_different_texts_are_all_kept() -> None:
    index = NearDuplicateIndex()
    assert [index.add(text(sentence(seed))) for seed in range(20)] == [None] * 20
    assert len(index) == 20


def test_rouge_l_rejects_an_lsh_candidate_whose_words_come_in_another_order() -> None:
    # Two halves swapped: 56 of the 60 distinct 3-gram shingles are shared (Jaccard 0.93, surely an LSH candidate)
    # but the longest common subsequence is one half (ROUGE-L 0.5): not a near duplicate.
    first, second = sentence(3, 30), sentence(4, 30)
    index = NearDuplicateIndex()
    assert index.add(text(first + second)) is None
    assert index.add(text(second + first)) is None
    assert index.candidates_checked == 1
    assert not index.is_near_duplicate(first + second, second + first)
    assert index.is_near_duplicate(first + second, [*first, *second, "w1"])


def test_rouge_threshold_is_separate_from_the_lsh_threshold() -> None:
    base = sentence(5)
    edited = [*base, "w1", "w2", "w3"]  # ROUGE-L 80 / 83 = 0.964
    strict = NearDuplicateIndex(rouge_threshold=0.97)
    assert strict.add(text(base)) is None
    assert strict.add(text(edited)) is None
    loose = NearDuplicateIndex(rouge_threshold=0.95)
    assert loose.add(text(base)) is None
    assert loose.add(text(edited)) == "near_duplicate"


def test_extend_indexes_existing_rows_without_judging_them() -> None:
    base = sentence(6)
    index = NearDuplicateIndex()
    index.extend([text(base), text([*base, "w1"]), text(base)])
    assert len(index) == 2  # the near copy among existing rows stays; the exact repeat is indexed once
    assert index.add(text(base).upper()) == "exact_duplicate"
    assert index.add(text([*base, "w2"])) == "near_duplicate"


def test_add_many_equals_one_add_after_another() -> None:
    texts = [text(sentence(seed % 7)) if seed % 3 else text([*sentence(seed % 7), "w1"]) for seed in range(30)]
    texts += ["", "!!", "one", "One.", "two words", "words two"]
    one_by_one = NearDuplicateIndex()
    expected = [one_by_one.add(t) for t in texts]
    assert NearDuplicateIndex().add_many(texts) == expected
    assert expected[-6:] == [None, "exact_duplicate", None, "exact_duplicate", None, None]


def test_lsh_bands_catch_pairs_at_the_threshold() -> None:
    for threshold in (0.7, 0.8, 0.9, 0.95):
        for num_perm in (32, 64, 128, 256):
            bands, rows = lsh_bands(threshold, num_perm)
            assert bands * rows <= num_perm
            assert 1 - (1 - threshold**rows) ** bands >= 0.99
    assert lsh_bands(0.9, 64) == (9, 7)
    assert lsh_bands(0.9, 128) == (12, 10)


@pytest.mark.parametrize("num_perm", [64, 128])
def test_signatures_are_datasketchs_for_the_same_shingle_hashes(num_perm: int) -> None:
    batch = TokenHasher().batch(["The quick brown fox jumps over the lazy dog.", "hi", "", "Hello, World! Again."])
    rows, sigs = signatures(batch, Signer(num_perm, seed=1))
    shingles, counts = batch.shingles()
    assert rows == [0, 1, -1, 2]
    assert counts.tolist() == [7, 1, 0, 1]  # 9 words give 7 word 3-grams; shorter texts give their unigrams
    starts = np.cumsum(counts) - counts
    for row, start, count in zip(rows, starts, counts, strict=True):
        if row < 0:
            continue
        reference = MinHash(num_perm=num_perm, seed=1, hashfunc=int)
        reference.update_batch(shingles[start : start + count].tolist())
        assert np.array_equal(reference.hashvalues, sigs[row])


def test_signatures_of_long_batches_span_several_chunks() -> None:
    texts = [text(sentence(seed, 2000)) for seed in range(40)]  # 80K shingles: more than one numpy chunk
    signer = Signer(64, seed=1)
    _, together = signatures(TokenHasher().batch(texts), signer)
    one_by_one = [signatures(TokenHasher().batch([t]), signer)[1][0] for t in texts]
    assert np.array_equal(together, np.stack(one_by_one))


_SIGNATURE_SCRIPT = """
import json
from llamaduo_synthesizer.dedup import Signer, TokenHasher, signatures
_, sigs = signatures(TokenHasher().batch(["A sentence of several words, to sign.", "Two words"]), Signer(64, 1))
print(json.dumps(sigs.tolist()))
"""


def test_signatures_are_the_same_in_every_process() -> None:
    # Python's own str hash changes per process; ours must not, or a redelivered task could decide differently.
    results = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", _SIGNATURE_SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        results.append(json.loads(run.stdout))
    assert results[0] == results[1]


def test_same_inputs_same_decisions() -> None:
    texts = [text(sentence(seed % 11)) + (" w1" if seed % 2 else "") for seed in range(60)]
    assert NearDuplicateIndex().add_many(texts) == NearDuplicateIndex().add_many(texts)
