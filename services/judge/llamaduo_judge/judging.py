"""Scoring the fine-tuned model's responses with the service LLM (or a panel of them) as judge, and aggregating."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from llamaduo.contract.events import Agreement, MetricSummary, Spend
from llamaduo.contract.spec import EvaluationSpec, Metric, TaskSpec
from llamaduo.data.results import Judgment, PromptResponses
from llamaduo.data.rows import ChatRow
from llamaduo.llm import Ledger, LLMReplyError, LLMRequestError, ServiceLLM, SpendCapReached, TokenLogprob
from llamaduo_judge.prompts import (
    JUDGMENT_SCHEMA,
    REASON_HARD_MAX_CHARS,
    REASON_MAX_CHARS,
    SCHEMA_NAME,
    judge_messages,
)
from llamaduo_judge.statistics import bootstrap_mean_ci, krippendorff_alpha_interval, spearman

METRICS: tuple[Metric, ...] = ("similarity", "precision")
Combine = Literal["mean", "strictest"]
ResponseKey = tuple[int, int]
"""(test row index, response index): one response of the fine-tuned model."""

TOP_LOGPROBS = 20
"""Alternatives asked for per token when weighting scores (the most OpenAI's API returns)."""
_NONCE_STRIDE = 1000
"""Judges of a panel sharing a model name get disjoint nonces, so they never read each other's cache entries."""
_SCORE_TEXT = re.compile(r"\s*(\d{1,3})(?:\.0*)?\s*")
_SCORE_TOKEN = re.compile(r"""[\s"':]*(\d{1,3})[\s"',}]*""")


def _score(value: object) -> int:
    """A score as the integer 1..100 it means; anything else (booleans, fractions, NaN, words) is refused."""
    number: int | None = None
    if isinstance(value, bool):
        number = None  # JSON true is not the score 1
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (match := _SCORE_TEXT.fullmatch(value)):
        number = int(match.group(1))
    if number is None:
        raise ValueError(f"must be an integer from 1 to 100, got {_preview(value)}")
    if not 1 <= number <= 100:
        raise ValueError(f"must be within 1..100, got {number}")
    return number


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


class JudgeReply(BaseModel):
    """What the judge must answer; malformed or out-of-range scores are rejected so the client re-asks."""

    model_config = ConfigDict(extra="ignore")

    similarity: int
    precision: int
    reason: str = ""

    @field_validator("similarity", "precision", mode="before")
    @classmethod
    def _integer_score(cls, value: object) -> int:
        return _score(value)

    @field_validator("reason", mode="before")
    @classmethod
    def _bounded_reason(cls, value: object) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        if len(value) > REASON_HARD_MAX_CHARS:
            # Pages of "reason" mean the judge stopped following the prompt (often an injected response).
            raise ValueError(f"must be at most {REASON_MAX_CHARS} characters, got {len(value)}")
        # A merely verbose reason is no reason to throw a valid score away.
        return value.strip()[: REASON_MAX_CHARS * 2]


def parse_judge_reply(data: dict[str, Any]) -> JudgeReply:
    """The judge's JSON object as a `JudgeReply`; raises `ValueError` (pydantic's) when it is unusable."""
    return JudgeReply.model_validate(data)


def weighted_score(logprobs: Sequence[TokenLogprob], metric: str, value: int) -> float | None:
    """G-Eval: the probability-weighted mean of the integer alternatives of the token that carries `metric`'s score.

    None when the score's token cannot be located (it is split over tokens, or the logprobs do not match the reply)
    or has no usable probabilities: the caller keeps the integer.
    """
    text = "".join(token.token for token in logprobs)
    matches = list(re.finditer(rf'"{re.escape(metric)}"\s*:\s*"?(\d+)', text))
    if not matches:
        return None
    # JSON keeps the last of duplicate keys, so that is the occurrence the parsed value came from.
    digits = matches[-1]
    if int(digits.group(1)) != value:
        return None
    start = 0
    for token in logprobs:
        end = start + len(token.token)
        if start <= digits.start(1) < end:
            if end < digits.end(1):
                return None  # the number is split over tokens: its alternatives are not whole scores
            return _expected_value(token, value)
        start = end
    return None


def _expected_value(token: TokenLogprob, value: int) -> float | None:
    mass: dict[int, float] = defaultdict(float)
    for text, logprob in token.top:
        match = _SCORE_TOKEN.fullmatch(text)
        if match and 1 <= (number := int(match.group(1))) <= 100 and not math.isnan(logprob):
            mass[number] += math.exp(min(0.0, logprob))
    if value not in mass and not math.isnan(token.logprob):
        # A sampled token may fall outside the top alternatives; it still carries its own probability.
        mass[value] += math.exp(min(0.0, token.logprob))
    total = math.fsum(mass.values())
    if not total > 0.0:
        return None
    return min(100.0, max(1.0, math.fsum(p * v for v, p in mass.items()) / total))


def judge_labels(models: Sequence[str]) -> list[str]:
    """One distinct name per judge: its model, suffixed `#2`, `#3` ... when a panel repeats a model."""
    seen: dict[str, int] = defaultdict(int)
    labels: list[str] = []
    for model in models:
        seen[model] += 1
        labels.append(model if seen[model] == 1 else f"{model}#{seen[model]}")
    return labels


@dataclass(frozen=True)
class JudgeOutcome:
    """Every judgment, the panel's per-metric summaries, each judge's, their agreement, failures and the cost."""

    judgments: list[Judgment]
    scores: dict[Metric, MetricSummary]
    failed: int
    spend: Spend
    judges: list[str] = field(default_factory=list)
    per_judge: dict[str, dict[Metric, MetricSummary]] = field(default_factory=dict)
    agreement: Agreement | None = None
    skipped_for_budget: int = 0
    budget_exhausted: bool = False


SKIPPED_FOR_BUDGET = "not judged: budget:cost"
"""The error of a judgment never requested because it could have passed the migration's dollar cap."""


async def judge_responses(
    test_rows: Sequence[ChatRow],
    responses: Sequence[PromptResponses],
    judges: ServiceLLM | Sequence[ServiceLLM],
    *,
    evaluation: EvaluationSpec,
    task: TaskSpec,
    cache_scope: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> JudgeOutcome:
    """Every judge scores every (test prompt, response, repeat) once, concurrently; failures are kept, never zeroed.

    `judges` is one `ServiceLLM` or the panel (the spec's `judge` first, then `evaluation.panel`). Raises
    `ValueError` when a response names a test row that does not exist, and lets `LLMUnavailable` and
    configuration-level `LLMRequestError`s (401, 403, 404) through: the whole task should be retried or failed.
    """
    panel = [judges] if isinstance(judges, ServiceLLM) else list(judges)
    if not panel:
        raise ValueError("judging needs at least one judge")
    labels = judge_labels([llm.model for llm in panel])
    ordinals = [sum(llm.model == other.model for other in panel[:number]) for number, llm in enumerate(panel)]
    jobs: list[tuple[int, PromptResponses, int, int]] = []
    for item in responses:
        if not 0 <= item.index < len(test_rows):
            raise ValueError(f"responses name test row {item.index}, but the test split has {len(test_rows)} rows")
        for judge, response_index, repeat in itertools.product(
            range(len(panel)), range(len(item.responses)), range(evaluation.repeats)
        ):
            jobs.append((judge, item, response_index, repeat))
    total = len(jobs)
    ledger = Ledger()
    done = 0
    exhausted = False

    async def judge_one(judge: int, item: PromptResponses, response_index: int, repeat: int) -> Judgment:
        nonlocal done
        llm = panel[judge]
        row = test_rows[item.index]
        scores: dict[Metric, float] = {}
        weighted = False
        reason = ""
        error: str | None = None
        try:
            reply = await llm.chat_json(
                judge_messages(task, row, item.responses[response_index].text),
                schema=JUDGMENT_SCHEMA,
                schema_name=SCHEMA_NAME,
                validate=parse_judge_reply,
                cache_scope=cache_scope,
                # Repeats are separate samples of the judge, so they must not share a cache entry.
                nonce=repeat + _NONCE_STRIDE * ordinals[judge],
                top_logprobs=TOP_LOGPROBS if evaluation.logprob_weighting else None,
            )
        except LLMReplyError as exc:
            ledger.add(exc)
            error = str(exc)
        except LLMRequestError as exc:
            if not exc.item_level:
                raise
            error = str(exc)
        except SpendCapReached as exc:
            # Not sent, not paid: the migration's dollar cap stops judging here, with what is judged so far.
            nonlocal exhausted
            exhausted = True
            error = f"{SKIPPED_FOR_BUDGET}: {exc}"
        else:
            ledger.add(reply)
            reason = reply.value.reason
            scores = {metric: float(getattr(reply.value, metric)) for metric in METRICS}
            if evaluation.logprob_weighting and reply.logprobs:
                found = {m: weighted_score(reply.logprobs, m, getattr(reply.value, m)) for m in METRICS}
                # All or nothing, so `weighted` says truthfully what every score of the judgment is.
                if all(value is not None for value in found.values()):
                    scores = {m: float(v) for m, v in found.items() if v is not None}
                    weighted = True
        judgment = Judgment(
            index=item.index,
            response_index=response_index,
            repeat=repeat,
            judge_model=labels[judge],
            similarity=scores.get("similarity"),
            precision=scores.get("precision"),
            reason=reason,
            error=error,
            weighted=weighted,
        )
        done += 1
        if on_progress is not None:
            on_progress(done, total)
        return judgment

    # A TaskGroup cancels the other judgments as soon as one raises a task-level error.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(judge_one(*job)) for job in jobs]
    except ExceptionGroup as errors:
        # Callers handle one fault (LLMUnavailable, LLMRequestError), not a group of the same fault.
        raise errors.exceptions[0] from None
    order = {label: number for number, label in enumerate(labels)}
    judgments = sorted(
        (t.result() for t in tasks), key=lambda j: (j.index, j.response_index, order[j.judge_model], j.repeat)
    )
    skipped = sum(1 for j in judgments if j.error is not None and j.error.startswith(SKIPPED_FOR_BUDGET))
    failed = sum(1 for j in judgments if j.error is not None) - skipped

    def summarise(chosen: Sequence[Judgment]) -> dict[Metric, MetricSummary]:
        return aggregate(
            chosen,
            combine=evaluation.combine,
            confidence=evaluation.confidence,
            bootstrap_samples=evaluation.bootstrap_samples,
        )

    per_judge = {label: summarise([j for j in judgments if j.judge_model == label]) for label in labels}
    return JudgeOutcome(
        judgments=judgments,
        scores=summarise(judgments),
        failed=failed,
        spend=ledger.spend,
        judges=labels,
        per_judge=per_judge,
        agreement=agreement(judgments, labels, per_judge=per_judge),
        skipped_for_budget=skipped,
        budget_exhausted=exhausted,
    )


def response_scores(judgments: Sequence[Judgment], metric: Metric) -> dict[str, dict[ResponseKey, float]]:
    """Per judge, per response: the mean of that judge's successful repeats of `metric`."""
    repeats: dict[str, dict[ResponseKey, list[float]]] = defaultdict(lambda: defaultdict(list))
    for judgment in judgments:
        value = getattr(judgment, metric)
        if judgment.error is None and value is not None:
            repeats[judgment.judge_model][(judgment.index, judgment.response_index)].append(float(value))
    return {
        judge: {key: statistics.fmean(values) for key, values in sorted(per_response.items())}
        for judge, per_response in repeats.items()
    }


def combined_scores(judgments: Sequence[Judgment], metric: Metric, combine: Combine = "mean") -> list[float]:
    """The panel's score of every response some judge scored: the judges' mean, or the lowest (`strictest`).

    A judge that never produced a valid score for a response has no say on it; the others still score it.
    """
    by_response: dict[ResponseKey, list[float]] = defaultdict(list)
    for per_response in response_scores(judgments, metric).values():
        for key, value in per_response.items():
            by_response[key].append(value)
    pick: Callable[[list[float]], float] = min if combine == "strictest" else statistics.fmean
    return [pick(values) for _, values in sorted(by_response.items())]


def aggregate(
    judgments: Sequence[Judgment],
    *,
    combine: Combine = "mean",
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
) -> dict[Metric, MetricSummary]:
    """Per metric over responses (each the panel's combined mean of repeats): mean, median, shares, bootstrap CI.

    A metric with no successful judgment at all is left out rather than reported as zero.
    """
    scores: dict[Metric, MetricSummary] = {}
    for metric in METRICS:
        values = combined_scores(judgments, metric, combine)
        if not values:
            continue
        low, high = bootstrap_mean_ci(values, confidence=confidence, samples=bootstrap_samples)
        scores[metric] = MetricSummary(
            mean=statistics.fmean(values),
            median=statistics.median(values),
            share_ge_50=sum(v >= 50 for v in values) / len(values),
            share_ge_70=sum(v >= 70 for v in values) / len(values),
            judged=len(values),
            ci_low=low,
            ci_high=high,
        )
    return scores


def agreement(
    judgments: Sequence[Judgment],
    judges: Sequence[str],
    *,
    per_judge: Mapping[str, dict[Metric, MetricSummary]] | None = None,
) -> Agreement | None:
    """How far the panel's judges agree per metric; None with fewer than two judges.

    Spearman: the mean over judge pairs of the rank correlation over the responses every judge scored. Alpha:
    Krippendorff's interval alpha over judges x responses, a judge's missing scores left missing.
    """
    if len(judges) < 2:
        return None
    rho: dict[Metric, float | None] = {}
    alpha: dict[Metric, float | None] = {}
    for metric in METRICS:
        by_judge = response_scores(judgments, metric)
        tables = [by_judge.get(judge, {}) for judge in judges]
        shared = sorted(set.intersection(*(set(table) for table in tables)))
        pairs = [
            spearman([a[key] for key in shared], [b[key] for key in shared])
            for a, b in itertools.combinations(tables, 2)
        ]
        defined = [value for value in pairs if value is not None]
        rho[metric] = statistics.fmean(defined) if defined else None
        units = sorted(set().union(*(set(table) for table in tables)))
        alpha[metric] = krippendorff_alpha_interval([[table.get(key) for key in units] for table in tables])
    return Agreement(
        judges=list(judges),
        spearman=rho,
        krippendorff_alpha=alpha,
        per_judge=dict(per_judge) if per_judge is not None else {},
    )
