"""The judge's domain logic against the scripted service LLM: prompts, repeats, failures, aggregation."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamaduo.contract.spec import EvaluationSpec, TaskSpec
from llamaduo.data.results import Judgment, PromptResponses, Response
from llamaduo.data.rows import ChatRow, make_row
from llamaduo.llm import LLMRequestError
from llamaduo.store import LocalStore
from llamaduo_judge.judging import aggregate, judge_responses
from llamaduo_judge.prompts import JUDGMENT_SCHEMA
from tests.support.llm import make_service_llm
from tests.support.scripted_llm import ScriptedLLM

TASK = TaskSpec(name="capital cities", description="Name the capital of the country asked about.")
SCORES = {"Paris.": (95, 90), "Lyon.": (30, 60), "Berlin.": (85, 75), "Munich.": (50, 45)}
_RESPONSE = re.compile(r"<language_model_response>\n(.*?)\n</language_model_response>", re.DOTALL)


def score_by_response(body: dict[str, Any]) -> tuple[int, int]:
    text = "\n".join(m["content"] for m in body["messages"])
    match = _RESPONSE.search(text)
    assert match, "the judge prompt must carry the model's response"
    return SCORES.get(match.group(1), (1, 1))


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(judge_score=score_by_response) as scripted:
        yield scripted


@pytest.fixture
def server(shared_server: ScriptedLLM) -> ScriptedLLM:
    # One server per module (starting one costs ~0.2 s); every test starts from its initial state.
    shared_server.reset()
    return shared_server


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def rows() -> list[ChatRow]:
    return [
        make_row("What is the capital of France?", "The capital of France is Paris.", origin="coverage"),
        make_row("What is the capital of Germany?", "Berlin is the capital of Germany.", origin="coverage"),
    ]


def responses(*texts_per_prompt: list[str]) -> list[PromptResponses]:
    return [
        PromptResponses(
            index=index,
            prompt=row.prompt,
            responses=[
                Response(text=t, prompt_tokens=5, completion_tokens=2, finish_reason="stop", latency_s=0.1)
                for t in texts
            ],
        )
        for index, (row, texts) in enumerate(zip(rows(), texts_per_prompt, strict=True))
    ]


def expected(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "share_ge_50": sum(v >= 50 for v in values) / len(values),
        "share_ge_70": sum(v >= 70 for v in values) / len(values),
        "judged": len(values),
    }


async def test_scores_aggregate_over_responses(server: ScriptedLLM, store: LocalStore) -> None:
    progress: list[tuple[int, int]] = []
    async with make_service_llm(server, store) as llm:
        outcome = await judge_responses(
            rows(),
            responses(["Paris.", "Lyon."], ["Berlin.", "Munich."]),
            llm,
            evaluation=EvaluationSpec(),
            task=TASK,
            cache_scope="mig-judge",
            on_progress=lambda done, total: progress.append((done, total)),
        )
    assert outcome.failed == 0
    assert [(j.index, j.response_index, j.repeat) for j in outcome.judgments] == [
        (0, 0, 0),
        (0, 1, 0),
        (1, 0, 0),
        (1, 1, 0),
    ]
    assert all(j.judge_model == "scripted" and j.error is None for j in outcome.judgments)
    assert outcome.scores["similarity"].model_dump(exclude={"ci_low", "ci_high"}) == pytest.approx(
        expected([95, 30, 85, 50])
    )
    assert outcome.scores["precision"].model_dump(exclude={"ci_low", "ci_high"}) == pytest.approx(
        expected([90, 60, 75, 45])
    )
    assert progress[-1] == (4, 4) and len(progress) == 4
    assert outcome.spend.calls == 4 and outcome.spend.cached_calls == 0
    assert outcome.spend.prompt_tokens > 0 and outcome.spend.usd > 0


async def test_prompt_carries_instruction_reference_and_response(server: ScriptedLLM, store: LocalStore) -> None:
    async with make_service_llm(server, store) as llm:
        await judge_responses(
            rows()[:1],
            responses(["Paris."], [])[:1],
            llm,
            evaluation=EvaluationSpec(),
            task=TASK,
            cache_scope="mig-judge",
        )
    (body,) = server.requests
    text = "\n".join(m["content"] for m in body["messages"])
    assert "What is the capital of France?" in text
    assert "The capital of France is Paris." in text
    assert "<language_model_response>\nParis.\n</language_model_response>" in text
    assert TASK.description in text
    assert body["response_format"]["json_schema"]["name"] == "judgment"
    assert body["response_format"]["json_schema"]["schema"] == JUDGMENT_SCHEMA


async def test_repeats_are_distinct_calls_and_replay_from_cache(
    server: ScriptedLLM, store: LocalStore, tmp_path: Path
) -> None:
    evaluation = EvaluationSpec(repeats=3)
    items = responses(["Paris."], ["Berlin.", "Munich."])
    async with make_service_llm(server, store) as llm:
        first = await judge_responses(rows(), items, llm, evaluation=evaluation, task=TASK, cache_scope="mig-judge")
    assert len(first.judgments) == 9
    assert sorted({j.repeat for j in first.judgments}) == [0, 1, 2]
    # One cache entry per (response, repeat): the repeats were different requests (nonce = repeat).
    assert len(list((tmp_path / "store" / "llm-cache" / "mig-judge").glob("*.json"))) == 9
    assert first.scores["similarity"].judged == 3
    sent = len(server.requests)
    async with make_service_llm(server, store) as llm:
        again = await judge_responses(rows(), items, llm, evaluation=evaluation, task=TASK, cache_scope="mig-judge")
    assert len(server.requests) == sent  # a redelivered task is answered from the cache
    assert again.judgments == first.judgments
    assert again.spend.calls == first.spend.calls == 9
    assert again.spend.cached_calls == 9 and again.spend.usd == pytest.approx(first.spend.usd)


async def test_malformed_forever_gives_failed_judgments_not_zeros(store: LocalStore) -> None:
    with ScriptedLLM(fault_rate=1.0, fault_kinds=("malformed",)) as server:
        async with make_service_llm(server, store) as llm:
            outcome = await judge_responses(
                rows(),
                responses(["Paris."], ["Berlin."]),
                llm,
                evaluation=EvaluationSpec(),
                task=TASK,
                cache_scope="mig-judge",
            )
        assert len(server.requests) == 2 * 3  # the first ask and two re-asks each
    assert outcome.failed == 2
    assert all(j.error and j.similarity is None and j.precision is None for j in outcome.judgments)
    assert outcome.scores == {}
    assert outcome.spend.calls == 6 and outcome.spend.completion_tokens > 0


async def test_one_bad_judgment_is_failed_and_left_out_of_scores(store: LocalStore) -> None:
    def judge(body: dict[str, Any]) -> tuple[int, int]:
        # 0 is out of range: validation fails on every attempt for this response only.
        return (0, 0) if "Lyon." in body["messages"][1]["content"] else score_by_response(body)

    with ScriptedLLM(judge_score=judge) as server:
        async with make_service_llm(server, store) as llm:
            outcome = await judge_responses(
                rows(),
                responses(["Paris.", "Lyon."], ["Berlin."]),
                llm,
                evaluation=EvaluationSpec(),
                task=TASK,
                cache_scope="mig-judge",
            )
    assert outcome.failed == 1
    (bad,) = [j for j in outcome.judgments if j.error]
    assert (bad.index, bad.response_index) == (0, 1)
    assert "similarity" in (bad.error or "")
    assert outcome.scores["similarity"].model_dump(exclude={"ci_low", "ci_high"}) == pytest.approx(expected([95, 85]))


async def test_configuration_errors_fail_the_task(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(401)
    async with make_service_llm(server, store) as llm:
        with pytest.raises(LLMRequestError):
            await judge_responses(
                rows()[:1],
                responses(["Paris."], [])[:1],
                llm,
                evaluation=EvaluationSpec(),
                task=TASK,
                cache_scope="mig-judge",
            )


async def test_unknown_test_row_is_rejected(server: ScriptedLLM, store: LocalStore) -> None:
    items = [PromptResponses(index=7, prompt="?", responses=[])]
    async with make_service_llm(server, store) as llm:
        with pytest.raises(ValueError, match="test row 7"):
            await judge_responses(rows(), items, llm, evaluation=EvaluationSpec(), task=TASK, cache_scope="mig-judge")


def test_aggregate_averages_repeats_per_response_first() -> None:
    def judgment(index: int, response: int, repeat: int, score: int | None) -> Judgment:
        return Judgment(
            index=index,
            response_index=response,
            repeat=repeat,
            judge_model="m",
            similarity=score,
            precision=score,
            error=None if score is not None else "no valid reply",
        )

    judgments = [
        judgment(0, 0, 0, 40),
        judgment(0, 0, 1, 60),  # response (0, 0) averages to 50
        judgment(0, 0, 2, None),  # a failed repeat is ignored, not counted as zero
        judgment(1, 0, 0, 100),
    ]
    summary = aggregate(judgments)["similarity"]
    assert summary.model_dump(exclude={"ci_low", "ci_high"}) == pytest.approx(expected([50, 100]))
    assert aggregate([judgment(0, 0, 0, None)]) == {}
