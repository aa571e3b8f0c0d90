"""The judging task end to end without the bus: a real `LocalStore`, the scripted service LLM over HTTP, and a
stand-in for the task context. Panels, agreement, weighted scores, the idempotent re-emit and all-failed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import EvaluationCompleted, MigrationSpec, ResponsesReady
from llamaduo.contract.spec import BudgetSpec, ServiceLLMSpec
from llamaduo.data import JSONL_MEDIA_TYPE, dump_jsonl, make_row
from llamaduo.data.results import Judgment, PromptResponses, Response, dump_models, load_models
from llamaduo.llm import ServiceLLMSettings, SpendCap
from llamaduo.store import LocalStore, artifact_key
from llamaduo.telemetry import get_logger
from llamaduo_judge.settings import JudgeSettings
from llamaduo_judge.task import JudgingTask
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.integration
MIGRATION = "judge-task-001"
ANSWERS = {"A0": (90, 80), "A1": (60, 70), "B0": (40, 50), "B1": (75, 85), "C0": (20, 30), "C1": (95, 90)}


def scores(body: dict[str, Any]) -> tuple[int, int]:
    text = "\n".join(m["content"] for m in body["messages"])
    answer = text.split("<language_model_response>\n", 1)[1].split("\n", 1)[0]
    similarity, precision = ANSWERS[answer]
    if body["model"] == "judge-b":  # a harsher second judge that ranks the same way
        return similarity - 10, precision - 10
    return similarity, precision


class Context:
    """The parts of `TaskContext` the judging task uses: a logger and progress reporters."""

    def __init__(self) -> None:
        self.log = get_logger("tests.judge_task")
        self.progress: list[tuple[str, int, int | None]] = []

    spent_usd = 0.0
    """What the migration's ledger holds before this task (the coordinator's state)."""

    async def spend_cap(self, max_cost_usd: float | None) -> SpendCap | None:
        return SpendCap.for_migration(max_cost_usd, self.spent_usd)

    def progress_reporter(self, stage: str, min_interval_s: float = 1.0) -> Callable[[int, int | None], None]:
        return lambda done, total: self.progress.append((stage, done, total))


def ctx(context: Context) -> TaskContext:
    return cast(TaskContext, context)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(judge_score=scores) as server:
        yield server


def settings_for(server: ScriptedLLM) -> JudgeSettings:
    return JudgeSettings(
        service_llm=ServiceLLMSettings(
            base_url=server.base_url,
            model="judge-a",
            max_retries=2,
            backoff_base_s=0.01,
            backoff_max_s=0.02,
            input_usd_per_million=1.0,
            output_usd_per_million=2.0,
        )
    )


def event_for(store: LocalStore, evaluation: dict[str, Any] | None = None, iteration: int = 0) -> ResponsesReady:
    test = [make_row(f"question {p}", f"reference {p}", origin="coverage") for p in "ABC"]
    test_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "test.jsonl"), dump_jsonl(test))
    answers = [
        PromptResponses(
            index=i,
            prompt=row.prompt,
            responses=[
                Response(text=f"{p}{k}", prompt_tokens=3, completion_tokens=1, finish_reason="stop", latency_s=0)
                for k in range(2)
            ],
        )
        for i, (p, row) in enumerate(zip("ABC", test, strict=True))
    ]
    responses_ref = store.put_bytes(
        artifact_key(MIGRATION, iteration, "responses", "responses.jsonl"), dump_models(answers), JSONL_MEDIA_TYPE
    )
    spec = MigrationSpec.model_validate(
        {"task": {"name": "quiz"}, "coverage": {"uri": "unused"}, "evaluation": evaluation or {}}
    )
    return ResponsesReady(
        migration_id=MIGRATION,
        iteration=iteration,
        spec=spec,
        adapter=test_ref,
        dataset=test_ref,
        test=test_ref,
        responses=responses_ref,
        prompts=3,
        responses_per_prompt=2,
    )


def stored_summary(store: LocalStore, iteration: int = 0) -> dict[str, Any]:
    path = store.root / artifact_key(MIGRATION, iteration, "judgments", "evaluation.json")
    return cast(dict[str, Any], json.loads(path.read_bytes()))


async def test_a_panel_evaluation_carries_judges_agreement_and_the_whole_spend(
    server: ScriptedLLM, store: LocalStore
) -> None:
    task = JudgingTask(settings_for(server), store)
    event = event_for(store, {"panel": [{"model": "judge-b"}], "combine": "strictest", "repeats": 2})
    context = Context()
    (completed,) = await task(event, ctx(context))
    assert isinstance(completed, EvaluationCompleted)
    assert completed.judges == ["judge-a", "judge-b"]
    assert completed.failed_judgments == 0
    # Strictest of the panel is judge-b everywhere: 10 below judge-a.
    similarity = completed.scores["similarity"]
    assert similarity.mean == pytest.approx(sum(s for s, _ in ANSWERS.values()) / 6 - 10)
    assert similarity.judged == 6
    assert similarity.ci_low is not None and similarity.ci_high is not None
    assert similarity.ci_low < similarity.mean < similarity.ci_high
    agreement = completed.agreement
    assert agreement is not None and agreement.judges == ["judge-a", "judge-b"]
    assert agreement.spearman == {"similarity": pytest.approx(1.0), "precision": pytest.approx(1.0)}
    # A constant offset is disagreement for interval alpha, but small against the spread of the scores.
    alpha = agreement.krippendorff_alpha["similarity"]
    assert alpha is not None and 0.8 < alpha < 1.0
    assert agreement.per_judge["judge-a"]["similarity"].mean == pytest.approx(similarity.mean + 10)
    # Both judges were asked (and paid for): 3 prompts x 2 responses x 2 repeats x 2 judges.
    assert len(server.requests) == 24
    assert completed.spend.calls == 24 and completed.spend.usd > 0
    assert context.progress[-1] == ("judging", 24, 24)
    judgments = load_models(store.read_bytes(completed.judgments), Judgment, "judgments")
    assert len(judgments) == 24 and {j.judge_model for j in judgments} == {"judge-a", "judge-b"}
    summary = stored_summary(store)
    assert summary["judges"] == ["judge-a", "judge-b"]
    assert summary["agreement"]["spearman"]["similarity"] == pytest.approx(1.0)

    # Redelivered: the stored evaluation is re-emitted as it was, with no call to the service LLM.
    (again,) = await task(event, ctx(Context()))
    assert again == completed
    assert len(server.requests) == 24


async def test_a_single_judge_with_weighted_scores(server: ScriptedLLM, store: LocalStore) -> None:
    task = JudgingTask(settings_for(server), store)
    (completed,) = await task(event_for(store, {"logprob_weighting": True}), ctx(Context()))
    assert isinstance(completed, EvaluationCompleted)
    assert completed.judges == ["judge-a"] and completed.agreement is None
    judgments = load_models(store.read_bytes(completed.judgments), Judgment, "judgments")
    assert all(j.weighted for j in judgments)
    by_answer = {f"{'ABC'[j.index]}{j.response_index}": j.similarity for j in judgments}
    # 95 loses its +10 neighbour (105): 0.6*95 + 0.4*(0.12*90 + 0.12*100 + 0.08*85)/0.32 = 94.
    assert by_answer["C1"] == pytest.approx(94.0) and by_answer["A1"] == pytest.approx(60.0)
    assert stored_summary(store)["agreement"] is None


async def test_every_judgment_failing_fails_the_task_with_the_reason(store: LocalStore, tmp_path: Path) -> None:
    with ScriptedLLM(judge_score=0) as server:  # 0 is out of range: every reply is refused, re-asked, refused
        task = JudgingTask(settings_for(server), store)
        with pytest.raises(TaskError) as info:
            await task(event_for(store, {"panel": [{"model": "judge-b"}]}), ctx(Context()))
        assert len(server.requests) == 12 * 3
    assert info.value.reason == "all_judgments_failed"
    assert "all 12 judgments by judge-a, judge-b failed" in info.value.detail
    assert "similarity" in info.value.detail and "got 0" in info.value.detail
    assert len(info.value.detail) < 1500
    # The judgments (with their errors) are kept for people to read; no evaluation was stored or emitted.
    assert (store.root / artifact_key(MIGRATION, 0, "judgments", "judgments.jsonl")).exists()
    assert not (store.root / artifact_key(MIGRATION, 0, "judgments", "evaluation.json")).exists()


async def test_responses_that_do_not_match_the_test_split_fail_the_task(server: ScriptedLLM, store: LocalStore) -> None:
    event = event_for(store)
    bad = [PromptResponses(index=9, prompt="?", responses=[])]
    ref = store.put_bytes(artifact_key(MIGRATION, 0, "responses", "bad.jsonl"), dump_models(bad), JSONL_MEDIA_TYPE)
    with pytest.raises(TaskError) as info:
        await JudgingTask(settings_for(server), store)(event.model_copy(update={"responses": ref}), ctx(Context()))
    assert info.value.reason == "responses_mismatch"


async def test_an_evaluation_stored_before_panels_is_re_emitted(server: ScriptedLLM, store: LocalStore) -> None:
    event = event_for(store)
    store.put_bytes(artifact_key(MIGRATION, 0, "judgments", "judgments.jsonl"), b"", JSONL_MEDIA_TYPE)
    old = {
        "judge_model": "gpt-4o",
        "scores": {"similarity": {"mean": 80, "median": 80, "share_ge_50": 1, "share_ge_70": 1, "judged": 4}},
        "failed": 0,
        "spend": {"calls": 4},
    }
    store.put_bytes(
        artifact_key(MIGRATION, 0, "judgments", "evaluation.json"),
        json.dumps(old).encode(),
        "application/vnd.llamaduo.evaluation+json",
    )
    (completed,) = await JudgingTask(settings_for(server), store)(event, ctx(Context()))
    assert isinstance(completed, EvaluationCompleted)
    assert completed.judges == ["gpt-4o"] and completed.agreement is None
    assert completed.scores["similarity"].ci_low is None
    assert server.requests == []


async def test_the_dollar_cap_stops_judging_before_the_ledger_could_pass_it(
    server: ScriptedLLM, store: LocalStore, tmp_path: Path
) -> None:
    # What the whole evaluation costs without a cap, measured on a store of its own.
    uncapped_store = LocalStore(tmp_path / "uncapped")
    (full,) = await JudgingTask(settings_for(server), uncapped_store).__call__(
        event_for(uncapped_store), ctx(Context())
    )
    assert isinstance(full, EvaluationCompleted) and full.spend.calls == 6
    calls_before = len(server.requests)

    event = event_for(store)
    spent_before = 0.5
    # Room for about three calls after what the migration already spent (worst cases reserved, real costs settled).
    per_call = full.spend.usd / 6
    worst = ServiceLLMSpec().max_tokens * 2.0 / 1e6  # output price 2 USD/M; the prompt adds little
    cap = spent_before + 2 * per_call + worst
    event = event.model_copy(update={"spec": event.spec.model_copy(update={"budgets": BudgetSpec(max_cost_usd=cap)})})
    context = Context()
    context.spent_usd = spent_before
    (capped,) = await JudgingTask(settings_for(server), store)(event, ctx(context))
    assert isinstance(capped, EvaluationCompleted)
    assert capped.budget_exhausted
    sent = len(server.requests) - calls_before
    assert 0 < sent < 6 and capped.spend.calls == sent
    assert spent_before + capped.spend.usd <= cap, "the ledger never passes the cap"
    judgments = load_models(store.read_bytes(capped.judgments), Judgment, "judgments")
    skipped = [j for j in judgments if j.error and j.error.startswith("not judged: budget:cost")]
    assert len(skipped) == 6 - sent and capped.failed_judgments == 0
    assert stored_summary(store)["budget_exhausted"] is True
    # Redelivered: re-emitted as it was, nothing sent.
    (again,) = await JudgingTask(settings_for(server), store)(event, ctx(context))
    assert again == capped and len(server.requests) - calls_before == sent
