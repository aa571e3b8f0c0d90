"""Scoring the fine-tuned model's responses with the service LLM as judge, and aggregating the scores."""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llamaduo.contract.events import MetricSummary, Spend
from llamaduo.contract.spec import EvaluationSpec, Metric, TaskSpec
from llamaduo.data.results import Judgment, PromptResponses
from llamaduo.data.rows import ChatRow
from llamaduo.llm import Ledger, LLMReplyError, LLMRequestError, ServiceLLM
from llamaduo_judge.prompts import JUDGMENT_SCHEMA, REASON_MAX_CHARS, SCHEMA_NAME, judge_messages

METRICS: tuple[Metric, ...] = ("similarity", "precision")


class JudgeReply(BaseModel):
    """What the judge must answer; out-of-range scores are rejected so the client re-asks."""

    model_config = ConfigDict(extra="ignore")

    similarity: int = Field(ge=1, le=100)
    precision: int = Field(ge=1, le=100)
    reason: str = ""

    @field_validator("reason")
    @classmethod
    def _clip_reason(cls, value: str) -> str:
        # A verbose reason is no reason to throw a valid score away.
        return value.strip()[: REASON_MAX_CHARS * 2]


@dataclass(frozen=True)
class JudgeOutcome:
    """Every judgment, the per-metric summaries, how many judgments failed, and what the judging cost."""

    judgments: list[Judgment]
    scores: dict[Metric, MetricSummary]
    failed: int
    spend: Spend


def _parse_reply(data: dict[str, Any]) -> JudgeReply:
    return JudgeReply.model_validate(data)


async def judge_responses(
    test_rows: Sequence[ChatRow],
    responses: Sequence[PromptResponses],
    llm: ServiceLLM,
    *,
    evaluation: EvaluationSpec,
    task: TaskSpec,
    cache_scope: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> JudgeOutcome:
    """Judge every (test prompt, response, repeat) once, concurrently; failed judgments are kept, never zeroed.

    Raises `ValueError` when a response names a test row that does not exist, and lets `LLMUnavailable` and
    configuration-level `LLMRequestError`s (401, 403, 404) through: the whole task should be retried or failed.
    """
    jobs: list[tuple[PromptResponses, int, int]] = []
    for item in responses:
        if not 0 <= item.index < len(test_rows):
            raise ValueError(f"responses name test row {item.index}, but the test split has {len(test_rows)} rows")
        for response_index in range(len(item.responses)):
            jobs.extend((item, response_index, repeat) for repeat in range(evaluation.repeats))
    total = len(jobs)
    ledger = Ledger()
    done = 0

    async def judge_one(item: PromptResponses, response_index: int, repeat: int) -> Judgment:
        nonlocal done
        row = test_rows[item.index]
        similarity: int | None = None
        precision: int | None = None
        reason = ""
        error: str | None = None
        try:
            reply = await llm.chat_json(
                judge_messages(task, row, item.responses[response_index].text),
                schema=JUDGMENT_SCHEMA,
                schema_name=SCHEMA_NAME,
                validate=_parse_reply,
                cache_scope=cache_scope,
                # Repeats are separate samples of the judge, so they must not share a cache entry.
                nonce=repeat,
            )
        except LLMReplyError as exc:
            ledger.add(exc)
            error = str(exc)
        except LLMRequestError as exc:
            if not exc.item_level:
                raise
            error = str(exc)
        else:
            ledger.add(reply)
            similarity, precision, reason = reply.value.similarity, reply.value.precision, reply.value.reason
        judgment = Judgment(
            index=item.index,
            response_index=response_index,
            repeat=repeat,
            judge_model=llm.model,
            similarity=similarity,
            precision=precision,
            reason=reason,
            error=error,
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
    judgments = sorted((t.result() for t in tasks), key=lambda j: (j.index, j.response_index, j.repeat))
    failed = sum(1 for j in judgments if j.error is not None)
    return JudgeOutcome(judgments=judgments, scores=aggregate(judgments), failed=failed, spend=ledger.spend)


def aggregate(judgments: Sequence[Judgment]) -> dict[Metric, MetricSummary]:
    """Per metric over responses (each the mean of its successful repeats): mean, median, share >= 50 and >= 70.

    A metric with no successful judgment at all is left out rather than reported as zero.
    """
    scores: dict[Metric, MetricSummary] = {}
    for metric in METRICS:
        per_response: dict[tuple[int, int], list[int]] = defaultdict(list)
        for judgment in judgments:
            value = getattr(judgment, metric)
            if judgment.error is None and value is not None:
                per_response[(judgment.index, judgment.response_index)].append(int(value))
        values = [statistics.fmean(repeats) for repeats in per_response.values()]
        if not values:
            continue
        scores[metric] = MetricSummary(
            mean=statistics.fmean(values),
            median=statistics.median(values),
            share_ge_50=sum(v >= 50 for v in values) / len(values),
            share_ge_70=sum(v >= 70 for v in values) / len(values),
            judged=len(values),
        )
    return scores
