"""One judging task: responses.ready in, judgments artifact and evaluation.completed out (idempotent by key)."""

from __future__ import annotations

import asyncio

from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import Agreement, EvaluationCompleted, Event, MetricSummary, ResponsesReady, Spend
from llamaduo.data import JSONL_MEDIA_TYPE, read_rows
from llamaduo.data.results import PromptResponses, dump_models, load_models
from llamaduo.llm import ServiceLLM, resolve
from llamaduo.store import ArtifactStore
from llamaduo.store.outputs import StageOutputs
from llamaduo_judge.judging import JudgeOutcome, judge_responses
from llamaduo_judge.settings import JudgeSettings

SUMMARY_MEDIA_TYPE = "application/vnd.llamaduo.evaluation+json"
_ERRORS_SHOWN = 3


class JudgingTask:
    """Scores every response with the service LLM as judge, or re-emits the stored evaluation."""

    def __init__(self, settings: JudgeSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store

    async def __call__(self, event: ResponsesReady, ctx: TaskContext) -> list[Event]:
        """Handle responses.ready."""
        outputs = StageOutputs(self.store, event.migration_id, event.iteration, "judgments")
        summary = await outputs.completed("evaluation.json", SUMMARY_MEDIA_TYPE)
        judgments_ref = await outputs.head("judgments.jsonl", JSONL_MEDIA_TYPE)
        if summary is not None and judgments_ref is not None:
            ctx.log.info("evaluation already stored; re-emitting")
        else:
            test_rows = await asyncio.to_thread(read_rows, self.store, event.test)
            raw = await asyncio.to_thread(self.store.read_bytes, event.responses)
            responses = load_models(raw, PromptResponses, event.responses.uri)
            evaluation = event.spec.evaluation
            cap = await ctx.spend_cap(event.spec.budgets.max_cost_usd)
            judges = [
                ServiceLLM(resolve(self.settings.service_llm, spec), self.store, spend_cap=cap)
                for spec in [evaluation.judge, *evaluation.panel]
            ]
            try:
                outcome = await judge_responses(
                    test_rows,
                    responses,
                    judges,
                    evaluation=evaluation,
                    task=event.spec.task,
                    cache_scope=event.migration_id,
                    on_progress=ctx.progress_reporter("judging"),
                )
            except ValueError as exc:  # responses that do not match the test split
                raise TaskError("responses_mismatch", str(exc)) from exc
            finally:
                for llm in judges:
                    await llm.aclose()
            judgments_ref = await outputs.put("judgments.jsonl", dump_models(outcome.judgments), JSONL_MEDIA_TYPE)
            if not outcome.scores and not outcome.budget_exhausted:
                # Written above all the same, so people can read every judge's errors in the artifact.
                raise TaskError("all_judgments_failed", _all_failed_detail(outcome))
            summary = {
                "judge_model": outcome.judges[0],
                "judges": outcome.judges,
                "scores": {metric: value.model_dump() for metric, value in outcome.scores.items()},
                "failed": outcome.failed,
                "spend": outcome.spend.model_dump(),
                "agreement": outcome.agreement.model_dump() if outcome.agreement is not None else None,
                "budget_exhausted": outcome.budget_exhausted,
                "skipped_for_budget": outcome.skipped_for_budget,
            }
            # Written last: its presence means the whole output exists.
            await outputs.put_json("evaluation.json", summary, SUMMARY_MEDIA_TYPE)
        return [
            EvaluationCompleted(
                migration_id=event.migration_id,
                iteration=event.iteration,
                spec=event.spec,
                adapter=event.adapter,
                dataset=event.dataset,
                test=event.test,
                judgments=judgments_ref,
                scores={metric: MetricSummary.model_validate(value) for metric, value in summary["scores"].items()},
                failed_judgments=int(summary["failed"]),
                spend=Spend.model_validate(summary["spend"]),
                # An evaluation stored before panels existed names its one judge only as `judge_model`.
                judges=list(summary.get("judges") or [summary["judge_model"]]),
                agreement=Agreement.model_validate(summary["agreement"]) if summary.get("agreement") else None,
                budget_exhausted=bool(summary.get("budget_exhausted", False)),
            )
        ]


def _all_failed_detail(outcome: JudgeOutcome) -> str:
    """How many judgments failed and the first distinct errors, for the migration's failure reason."""
    total = len(outcome.judgments)
    if total == 0:
        return "there were no responses to judge"
    errors = list(dict.fromkeys(j.error for j in outcome.judgments if j.error))[:_ERRORS_SHOWN]
    shown = "; ".join(f"[{j}] {error[:300]}" for j, error in enumerate(errors, start=1))
    return f"all {total} judgments by {', '.join(outcome.judges)} failed; first errors: {shown}"
