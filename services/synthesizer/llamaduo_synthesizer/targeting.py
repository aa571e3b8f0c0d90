"""Failure-targeted synthesis: steer seed sampling and the prompt's `{focus}` toward what the judge scored low.

Only the judge's scores and reasons are used, and only per category: a reason can quote a test prompt or reference,
so each one passes through the test-set guard's `scrub` and is dropped when it still leaks (or still contains a
whole test text too short to have an n-gram). No test prompt or reference ever reaches a generator prompt from here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llamaduo.data.results import Judgment
from llamaduo.data.rows import ChatRow
from llamaduo_synthesizer.synthesis import normalize

EXPLORE = 0.25
"""Share of seed draws spread evenly over every category, so that no category is ever starved."""
MAX_REASONS = 3
"""Judge reasons quoted per category focus."""
MAX_REASON_CHARS = 300
"""Longer reasons are cut: the focus is a hint, not a transcript."""
PERFECT = 100.0
PASSING = 90.0
"""Judged scores at or above this are not failures worth quoting (the paper's graduation bar)."""


class LeakScreen(Protocol):
    """What targeting needs of the test-set guard (`decontamination.TestSetGuard`)."""

    def leaks(self, text: str) -> bool:
        """Whether any test n-gram is in `text`."""
        ...

    def scrub(self, text: str) -> str:
        """`text` with its test n-gram spans replaced."""
        ...


@dataclass(frozen=True)
class Targeting:
    """Seed-sampling weights and `{focus}` texts per category, from the judge's results of the last iteration."""

    scores: dict[str | None, float]
    """Mean judged score (1-100, the mean of the metrics) per test-split category that has any valid judgment."""
    weights: dict[str | None, float]
    """Relative seed-sampling weight per seed category; every one is positive."""
    focus: dict[str | None, str] = field(default_factory=dict)
    """The `{focus}` text per category ("" where nothing is worth saying)."""
    default_focus: str = ""
    """The focus of a seed category the test split has no judgments for: the overall weakest answers."""
    reasons_used: int = 0
    reasons_dropped: int = 0
    """Judge reasons left out because they still quoted the test split after scrubbing."""

    def focus_for(self, category: str | None) -> str:
        """The focus text of a seed's category."""
        return self.focus.get(category, self.default_focus)

    def summary(self) -> dict[str, object]:
        """A JSON-ready record of what steered this round."""
        return {
            "scores": {label(c): round(s, 2) for c, s in sorted(self.scores.items(), key=_category_order)},
            "weights": {label(c): round(w, 4) for c, w in sorted(self.weights.items(), key=_category_order)},
            "reasons_used": self.reasons_used,
            "reasons_dropped": self.reasons_dropped,
        }


def label(category: str | None) -> str:
    """A category as a JSON key (None, rows without a category, as "")."""
    return category or ""


def _category_order(item: tuple[str | None, object]) -> str:
    return label(item[0])


def judgment_score(judgment: Judgment) -> float | None:
    """The mean of a judgment's valid metrics, or None when it never produced a score."""
    values = [v for v in (judgment.similarity, judgment.precision) if v is not None]
    if judgment.error is not None or not values:
        return None
    return sum(values) / len(values)


def _scored(judgments: Iterable[Judgment], test_rows: Sequence[ChatRow]) -> list[tuple[float, Judgment]]:
    # An index outside the test split is a judge artifact out of step with it: such lines cannot be attributed.
    return [(score, j) for j in judgments if (score := judgment_score(j)) is not None and 0 <= j.index < len(test_rows)]


def category_scores(judgments: Iterable[Judgment], test_rows: Sequence[ChatRow]) -> dict[str | None, float]:
    """Mean score per test-split category (each judgment counts once; unscored ones are left out)."""
    totals: dict[str | None, list[float]] = defaultdict(list)
    for score, judgment in _scored(judgments, test_rows):
        totals[test_rows[judgment.index].category].append(score)
    return {category: sum(values) / len(values) for category, values in totals.items()}


def seed_weights(
    scores: dict[str | None, float], categories: Iterable[str | None], *, explore: float = EXPLORE
) -> dict[str | None, float]:
    """Sampling weight per seed category: an even `explore` share plus the rest in proportion to 100 - mean score.

    A category the judge has no score for counts as scoring the mean of the others (neither favoured nor starved).
    With no scores, or every category perfect, the weights are even.
    """
    names = sorted(set(categories), key=label)
    if not names:
        return {}
    known = [scores[c] for c in names if c in scores]
    neutral = sum(known) / len(known) if known else PERFECT
    deficits = {c: max(PERFECT - scores.get(c, neutral), 0.0) for c in names}
    total = sum(deficits.values())
    even = 1.0 / len(names)
    if total <= 0:
        return {c: even for c in names}
    return {c: explore * even + (1.0 - explore) * deficits[c] / total for c in names}


def _safe_reason(reason: str, guard: LeakScreen, test_texts: frozenset[str]) -> str | None:
    """The reason scrubbed of test n-grams and cut short, or None when it would still reveal test text."""
    text = " ".join(guard.scrub(reason).split())
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1].rstrip() + "…"
    if not text or guard.leaks(text):
        return None
    # Test texts shorter than the guard's n-gram have no n-gram to catch: look for them whole.
    padded = f" {normalize(text)} "
    if any(f" {t} " in padded for t in test_texts):
        return None
    return text


def _focus(category_mean: float | None, reasons: list[str]) -> str:
    """The `{focus}` paragraph: what the judge found missing in the weakest answers ("" without reasons)."""
    if not reasons:
        return ""
    head = "The model being trained on this data is weakest on answers like these"
    if category_mean is not None:
        head += f" (the judge's mean score in this category is {category_mean:.0f}/100)"
    notes = "\n".join(f"- {reason}" for reason in reasons)
    return (
        f"{head}. The judge's notes on its weakest answers:\n{notes}\n"
        "Write pairs whose responses get right what these notes say was missing or wrong."
    )


def build_targeting(
    judgments: Sequence[Judgment],
    test_rows: Sequence[ChatRow],
    seed_categories: Iterable[str | None],
    guard: LeakScreen,
    *,
    max_reasons: int = MAX_REASONS,
    passing: float = PASSING,
) -> Targeting:
    """Weights toward low-scoring categories and per-category focus texts built from scrubbed judge reasons.

    Only reasons of samples scoring below `passing` are quoted, the lowest first.
    """
    scores = category_scores(judgments, test_rows)
    categories = sorted(set(seed_categories), key=label)
    weights = seed_weights(scores, categories)
    test_texts = frozenset(t for row in test_rows for t in (normalize(row.prompt), normalize(row.reference)) if t)
    # Lowest scores first; ties in a fixed order, so that the prompts (and their cache keys) are reproducible.
    ranked = sorted(
        ((score, j) for score, j in _scored(judgments, test_rows) if score < passing and j.reason.strip()),
        key=lambda item: (item[0], item[1].index, item[1].response_index, item[1].repeat, item[1].judge_model),
    )
    safe: dict[str, str | None] = {}
    used = dropped = 0

    def pick(items: Iterable[tuple[float, Judgment]]) -> list[str]:
        nonlocal used, dropped
        chosen: list[str] = []
        for _, judgment in items:
            if len(chosen) >= max_reasons:
                break
            if judgment.reason not in safe:
                text = _safe_reason(judgment.reason, guard, test_texts)
                safe[judgment.reason] = text
                if text is None:
                    dropped += 1
                else:
                    used += 1
            text = safe[judgment.reason]
            if text is not None and text not in chosen:
                chosen.append(text)
        return chosen

    # Seed categories the judge scored get their own notes; the others fall back to the overall weakest answers.
    focus = {
        category: _focus(
            scores[category],
            pick(item for item in ranked if test_rows[item[1].index].category == category),
        )
        for category in categories
        if category in scores
    }
    default_focus = _focus(None, pick(ranked))
    return Targeting(
        scores=scores,
        weights=weights,
        focus=focus,
        default_focus=default_focus,
        reasons_used=used,
        reasons_dropped=dropped,
    )
