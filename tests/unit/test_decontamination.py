"""Decontamination against the test split: 13-gram leaks, short near copies, screening and scrubbing prompts."""

from __future__ import annotations

import random

import pytest

from llamaduo.data.rows import ChatRow, make_row
from llamaduo_synthesizer.decontamination import REDACTED, TestSetGuard

LONG_PROMPT = (
    "Write a commit message for this change: the deploy script now retries uploads three times with exponential "
    "backoff before giving up and printing the failing artifact name."
)
LONG_REFERENCE = (
    "fix: retry artifact uploads three times with exponential backoff in the deploy script and name the artifact "
    "that still fails after the last attempt"
)
SHORT_PROMPT = "Summarize this diff as a conventional commit"  # 7 tokens: no 13-gram possible
SHORT_REFERENCE = "docs: add Docker Compose setup to README"


def fullwidth(ascii_letters: str) -> str:
    """The same letters in their full-width forms, which NFKC folds back."""
    return "".join(chr(ord(letter) + 0xFEE0) for letter in ascii_letters)


def filler(seed: int, length: int = 20) -> str:
    """Words that appear in no test row."""
    return " ".join(random.Random(seed).choices([f"zz{i}" for i in range(300)], k=length))


@pytest.fixture(scope="module")
def guard() -> TestSetGuard:
    rows: list[ChatRow] = [
        make_row(LONG_PROMPT, LONG_REFERENCE, origin="coverage"),
        make_row(SHORT_PROMPT, SHORT_REFERENCE, origin="coverage"),
    ]
    return TestSetGuard(rows)


def span(text: str, start: int, length: int) -> str:
    return " ".join(text.split()[start : start + length])


def test_clean_pairs_pass(guard: TestSetGuard) -> None:
    assert guard.check(filler(1), filler(2)) is None
    assert guard.check("Write a commit message for this change.", "fix: typo") is None


@pytest.mark.parametrize("where", ["instruction", "response"])
def test_a_planted_13_gram_is_caught_in_instruction_and_response(guard: TestSetGuard, where: str) -> None:
    for source in (LONG_PROMPT, LONG_REFERENCE):
        leaked = f"{filler(3)} {span(source, 4, 13)} {filler(4)}"
        pair = (leaked, filler(5)) if where == "instruction" else (filler(5), leaked)
        assert guard.check(*pair) == "test_ngram_overlap"


def test_twelve_shared_words_are_not_an_ngram_leak(guard: TestSetGuard) -> None:
    assert guard.check(f"{filler(6)} {span(LONG_REFERENCE, 2, 12)} {filler(7)}", filler(8)) is None


def test_the_ngram_check_sees_through_case_width_and_punctuation(guard: TestSetGuard) -> None:
    leaked = span(LONG_REFERENCE, 0, 14).upper().replace(" ", ", ").replace("FIX", fullwidth("FIX"))
    assert guard.check(filler(9), leaked) == "test_ngram_overlap"


@pytest.mark.parametrize("where", ["instruction", "response"])
def test_short_near_copies_of_test_texts_are_caught_by_minhash(guard: TestSetGuard, where: str) -> None:
    # Too short for any 13-gram; one word added keeps 5 of 6 word 3-grams (Jaccard 0.83 >= 0.8).
    for copy in (f"Please {SHORT_PROMPT.lower()}!", f"{SHORT_REFERENCE} now"):
        pair = (copy, filler(10)) if where == "instruction" else (filler(10), copy)
        assert guard.check(*pair) == "test_near_duplicate"


def test_a_short_text_below_the_similarity_threshold_passes(guard: TestSetGuard) -> None:
    # Two words changed in the middle of a 7-word text: no word 3-gram left in common.
    assert guard.check("Summarize this patch as a semantic commit", filler(11)) is None


def test_check_many_equals_check(guard: TestSetGuard) -> None:
    pairs = [
        (filler(12), filler(13)),
        (f"{filler(14)} {span(LONG_PROMPT, 0, 13)}", filler(15)),
        (filler(16), f"{SHORT_REFERENCE}!"),
        ("", ""),
    ]
    assert guard.check_many(pairs) == [guard.check(*pair) for pair in pairs]
    assert guard.check_many(pairs) == [None, "test_ngram_overlap", "test_near_duplicate", None]


def test_leaks_screens_generator_prompts(guard: TestSetGuard) -> None:
    prompt = f"Here is an example.\n<example>{filler(17)}</example>\nWrite more like it."
    assert not guard.leaks(prompt)
    assert guard.leaks(prompt.replace("Write more", f"Note: {span(LONG_REFERENCE, 3, 13)}. Write more"))
    # A whole short test text inside a prompt, and a near copy of one on its own.
    assert guard.leaks(f"{filler(18)} Summarize this diff as a conventional commit. {filler(19)}")
    assert guard.leaks(f"Docs: add Docker Compose setup to README. {filler(20, 1)}")


def test_scrub_replaces_every_test_span_and_keeps_the_rest(guard: TestSetGuard) -> None:
    reason = (
        f"The response says {filler(21, 3)!r}, but the reference says '{LONG_REFERENCE}'; "
        f"like the expected '{SHORT_REFERENCE}' it names the change."
    )
    scrubbed = guard.scrub(reason)
    assert scrubbed == (
        f"The response says {filler(21, 3)!r}, but the reference says '{REDACTED}'; "
        f"like the expected '{REDACTED}' it names the change."
    )
    assert not guard.leaks(scrubbed)


def test_scrub_merges_overlapping_spans_and_leaves_clean_text_alone(guard: TestSetGuard) -> None:
    clean = f"Nothing here: {filler(22)}."
    assert guard.scrub(clean) == clean
    partial = f"Start {span(LONG_PROMPT, 0, 15)} middle {span(LONG_PROMPT, 10, 14)} end"
    assert guard.scrub(partial) == f"Start {REDACTED} middle {REDACTED} end"


def test_scrub_maps_casefolded_tokens_back_to_the_original_text() -> None:
    reference = "die große Straße führt durch den alten Park hinter dem Haus bis zum kleinen See am Waldrand"
    guard = TestSetGuard([make_row("ein kurzer Test", reference)])
    quoted = " ".join(reference.split()[:13])
    assert guard.scrub(f"Er sagte: {quoted.upper()}, ok") == f"Er sagte: {REDACTED}, ok"  # GROSSE, STRASSE
    assert guard.scrub(f"Er sagte: {quoted}, ok") == f"Er sagte: {REDACTED}, ok"
    # Text that changes under NFKC comes back in its NFKC form.
    assert guard.scrub(f"{fullwidth('Er')} sagte: {quoted}") == f"Er sagte: {REDACTED}"


def test_same_inputs_same_decisions(guard: TestSetGuard) -> None:
    pairs = [(filler(seed), f"{filler(seed + 1)} {SHORT_PROMPT if seed % 3 == 0 else ''}") for seed in range(30)]
    other = TestSetGuard([make_row(LONG_PROMPT, LONG_REFERENCE), make_row(SHORT_PROMPT, SHORT_REFERENCE)])
    assert guard.check_many(pairs) == other.check_many(pairs)
