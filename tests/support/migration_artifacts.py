"""A realistic migration written into a store through the real models: what the workers and coordinator leave behind.

Three iterations: 0 trains on the coverage train split, 1 and 2 on synthesized data; iteration 2 graduates (or, with
`finished=False`, has only its synthesized dataset so far). Scores, spend and throughput are chosen so a report's
numbers can be checked by hand; see the constants below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llamaduo.contract import ArtifactRef, MetricSummary, MigrationSpec, ResponsesReady, Spend
from llamaduo.contract.spec import Metric
from llamaduo.data import JSONL_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, DatasetManifest, Shard, dump_jsonl, make_row
from llamaduo.data.results import Judgment, PromptResponses, Response, dump_models
from llamaduo.state import IterationRecord, MigrationState
from llamaduo.store import ArtifactStore, artifact_key
from llamaduo.store.archive import TAR_MEDIA_TYPE

MIGRATION_ID = "commit-msg-report"
SCRIPT_PROMPT = "Summarise: <script>alert('x')</script> & fix the parser"
TEMPLATE = "Write {pairs} pairs for {task} like:\n{instruction}\n{response}\n{focus}"
TEST_PROMPTS = [
    "Summarise: add retry to the S3 client",
    "Summarise: bump pydantic to 2.7",
    SCRIPT_PROMPT,
    "Summarise: remove the unused cache flag",
]
REFERENCES = [
    "Retry S3 calls with backoff",
    "Bump pydantic to 2.7",
    "Fix the parser's <b>escaping</b>",
    "Remove the unused cache flag",
]
THRESHOLDS: dict[Metric, float] = {"similarity": 85.0, "precision": 80.0}
# Per (test row, response): each repeat's (similarity, precision) in the last iteration. Means over the two metrics:
# (1,1) 97.5, (0,0) 92.5, (3,1) 90, (1,0) 87, (2,1) 70.5, (0,1) 56, (3,0) 36, (2,0) 17.5.
LAST_SCORES: dict[tuple[int, int], list[tuple[int, int]]] = {
    (0, 0): [(95, 90), (93, 92)],
    (0, 1): [(60, 50), (62, 52)],
    (1, 0): [(88, 86), (88, 86)],
    (1, 1): [(99, 98), (97, 96)],
    (2, 0): [(20, 10), (30, 10)],
    (2, 1): [(70, 72), (70, 70)],
    (3, 0): [(40, 30), (44, 30)],
    (3, 1): [(91, 89), (91, 89)],
}
# Per iteration: (similarity mean, ci low, ci high), (precision ...).
SUMMARIES = {
    0: ((55.0, 48.0, 62.0), (50.0, 42.0, 58.0)),
    1: ((72.0, 66.0, 78.0), (68.0, 61.0, 75.0)),
    2: ((86.0, 80.5, 91.2), (82.0, 75.0, 88.0)),
}
JUDGE_SPEND = Spend(calls=16, prompt_tokens=16_000, completion_tokens=1_600, usd=0.05)
SYNTHESIS_SPEND = {
    1: Spend(calls=10, prompt_tokens=5_000, completion_tokens=8_000, usd=0.12),
    2: Spend(calls=20, prompt_tokens=10_000, completion_tokens=16_000, usd=0.24),
}
SYNTHETIC_ROWS = {1: 10, 2: 20}
TOKENS_PER_SECOND = {0: 180.0, 1: 210.0, 2: 250.0}
LOSSES = {0: 2.1, 1: 1.7, 2: 1.3}


@dataclass
class Built:
    """The state and what was stored for it, keyed by (iteration, `stage/name`)."""

    state: MigrationState
    refs: dict[tuple[int, str], ArtifactRef] = field(default_factory=dict)
    shards: dict[int, list[Shard]] = field(default_factory=dict)


def make_spec() -> MigrationSpec:
    """The spec: a judge panel of one, a custom synthesis template, thresholds that iteration 2 clears."""
    return MigrationSpec.model_validate(
        {
            "migration_id": MIGRATION_ID,
            "task": {"name": "commit <messages>", "description": "One line, imperative."},
            "coverage": {"uri": "file:///data/coverage.jsonl"},
            "evaluation": {"judge": {"model": "gpt-4o-mini"}, "thresholds": THRESHOLDS, "repeats": 2},
            "synthesis": {"generator": {"model": "gpt-4o"}, "prompt_template": TEMPLATE},
            "training": {"epochs": 2, "learning_rate": 1e-4},
        }
    )


def _json(store: ArtifactStore, iteration: int, stage: str, name: str, value: object, media_type: str) -> ArtifactRef:
    key = artifact_key(MIGRATION_ID, iteration, stage, name)
    return store.put_bytes(key, json.dumps(value, indent=1).encode(), media_type)


def _scores(iteration: int) -> dict[Metric, MetricSummary]:
    (sim, sim_low, sim_high), (prec, prec_low, prec_high) = SUMMARIES[iteration]
    return {
        "similarity": MetricSummary(
            mean=sim, median=sim, share_ge_50=0.8, share_ge_70=0.6, judged=8, ci_low=sim_low, ci_high=sim_high
        ),
        "precision": MetricSummary(
            mean=prec, median=prec, share_ge_50=0.7, share_ge_70=0.5, judged=8, ci_low=prec_low, ci_high=prec_high
        ),
    }


def _judgments(iteration: int) -> list[Judgment]:
    judgments: list[Judgment] = []
    for (index, response_index), repeats in LAST_SCORES.items():
        for repeat, (similarity, precision) in enumerate(repeats):
            # Earlier iterations score lower; the ranking is only checked on the last one.
            shift = (2 - iteration) * 20
            judgments.append(
                Judgment(
                    index=index,
                    response_index=response_index,
                    repeat=repeat,
                    judge_model="gpt-4o-mini",
                    similarity=max(1, similarity - shift),
                    precision=max(1, precision - shift),
                    reason=f"row {index} response {response_index}: <i>close</i> to the reference",
                )
            )
    # A judgment that never produced scores: it must not count toward any response's score.
    judgments.append(
        Judgment(index=3, response_index=0, repeat=2, judge_model="gpt-4o-mini", error="invalid JSON from the judge")
    )
    return judgments


def _responses() -> list[PromptResponses]:
    return [
        PromptResponses(
            index=index,
            prompt=prompt,
            responses=[
                Response(
                    text=f"answer {index}.{response_index} <em>model</em>",
                    prompt_tokens=20,
                    completion_tokens=12,
                    finish_reason="stop",
                    latency_s=0.3,
                )
                for response_index in range(2)
            ],
        )
        for index, prompt in enumerate(TEST_PROMPTS)
    ]


def _train_and_evaluate(built: Built, store: ArtifactStore, iteration: int, manifest_ref: ArtifactRef) -> None:
    refs = built.refs
    adapter = store.put_bytes(
        artifact_key(MIGRATION_ID, iteration, "adapter", "adapter.tar"), f"adapter {iteration}".encode(), TAR_MEDIA_TYPE
    )
    refs[(iteration, "adapter/adapter.tar")] = adapter
    spec = built.state.spec
    refs[(iteration, "adapter/training.json")] = _json(
        store,
        iteration,
        "adapter",
        "training.json",
        {
            "base_model": spec.base_model.id,
            "dataset": manifest_ref.model_dump(),
            "rows": 6 + sum(SYNTHETIC_ROWS.get(it, 0) for it in range(1, iteration + 1)),
            "steps": 10 * (iteration + 1),
            "train_loss": LOSSES[iteration],
            "seconds": 12.5,
            "tokens": 4000,
            "tokens_per_second": 320.0,
            "precision": "fp32-lora",
            "lora": spec.lora.model_dump(),
            "training": spec.training.model_dump(),
            "log_history": [
                {"loss": LOSSES[iteration] + 0.5, "step": 5.0, "epoch": 1.0},
                {"loss": LOSSES[iteration], "step": 10.0, "epoch": 2.0},
                {"train_runtime": 12.5, "step": 10.0},
            ],
        },
        "application/vnd.llamaduo.training-result+json",
    )
    refs[(iteration, "responses/inference.json")] = _json(
        store,
        iteration,
        "responses",
        "inference.json",
        {
            "backend": "transformers",
            "device": "cpu",
            "prompts": 4,
            "prompts_generated": 4,
            "responses_per_prompt": 2,
            "completion_tokens_generated": 96,
            "seconds": round(96 / TOKENS_PER_SECOND[iteration], 3),
            "completion_tokens_per_second": TOKENS_PER_SECOND[iteration],
        },
        "application/vnd.llamaduo.inference+json",
    )
    refs[(iteration, "responses/responses.jsonl")] = store.put_bytes(
        artifact_key(MIGRATION_ID, iteration, "responses", "responses.jsonl"),
        dump_models(_responses()),
        JSONL_MEDIA_TYPE,
    )
    judgments = store.put_bytes(
        artifact_key(MIGRATION_ID, iteration, "judgments", "judgments.jsonl"),
        dump_models(_judgments(iteration)),
        JSONL_MEDIA_TYPE,
    )
    refs[(iteration, "judgments/judgments.jsonl")] = judgments
    scores = _scores(iteration)
    refs[(iteration, "judgments/evaluation.json")] = _json(
        store,
        iteration,
        "judgments",
        "evaluation.json",
        {
            "judge_model": "gpt-4o-mini",
            "judges": ["gpt-4o-mini"],
            "scores": {metric: value.model_dump() for metric, value in scores.items()},
            "failed": 1,
            "spend": JUDGE_SPEND.model_dump(),
            "agreement": None,
        },
        "application/vnd.llamaduo.evaluation+json",
    )
    record = built.state.record(iteration)
    assert record is not None
    record.adapter, record.judgments, record.scores, record.failed_judgments = adapter, judgments, scores, 1
    record.spend = record.spend + JUDGE_SPEND
    record.decision = "graduated" if iteration == 2 else "need_more_data"
    built.state.spend = built.state.spend + JUDGE_SPEND


def build_migration(store: ArtifactStore, *, finished: bool = True) -> Built:
    """Write a three-iteration migration into `store`; with `finished=False`, iteration 2 is synthesized only."""
    spec = make_spec()
    test_rows = [
        make_row(prompt, reference, category=f"cat-{index % 2}", origin="coverage")
        for index, (prompt, reference) in enumerate(zip(TEST_PROMPTS, REFERENCES, strict=True))
    ]
    train_rows = [make_row(f"Summarise: change {n}", f"Change {n}", origin="coverage") for n in range(6)]
    coverage_key = artifact_key(MIGRATION_ID, None, "coverage", "{}.jsonl").format
    test = store.put_bytes(coverage_key("test"), dump_jsonl(test_rows), JSONL_MEDIA_TYPE)
    train = store.put_bytes(coverage_key("train"), dump_jsonl(train_rows), JSONL_MEDIA_TYPE)
    state = MigrationState(migration_id=MIGRATION_ID, spec=spec, status="running", train=train, test=test)
    built = Built(state=state)
    shards = [Shard(ref=train, rows=6, origin="coverage")]
    for iteration in range(3):
        spend = Spend()
        if iteration > 0:
            rows = [
                make_row(f"Summarise: synthetic {iteration}.{n}", f"Synthetic {n}")
                for n in range(SYNTHETIC_ROWS[iteration])
            ]
            part = store.put_bytes(
                artifact_key(MIGRATION_ID, iteration, "dataset", "synthetic-part-00000.jsonl"),
                dump_jsonl(rows),
                JSONL_MEDIA_TYPE,
            )
            shards = [
                *shards,
                Shard(ref=part, rows=SYNTHETIC_ROWS[iteration], origin="synthetic", round_index=iteration - 1),
            ]
            spend = SYNTHESIS_SPEND[iteration]
            built.refs[(iteration, "dataset/synthesis.json")] = _json(
                store,
                iteration,
                "dataset",
                "synthesis.json",
                {
                    "kept": SYNTHETIC_ROWS[iteration],
                    "asked": SYNTHETIC_ROWS[iteration] + 2,
                    "calls": spend.calls,
                    "failed_calls": 0,
                    "withheld_prompts": 0,
                    "seeds_excluded": 0,
                    "parts": 1,
                    "resumed_parts": 0,
                    "removed": {"near_duplicate": 2},
                    "spend": spend.model_dump(),
                    "targeting": None,
                    "budget_exhausted": False,
                },
                "application/vnd.llamaduo.synthesis+json",
            )
        built.shards[iteration] = shards
        manifest = DatasetManifest(migration_id=MIGRATION_ID, iteration=iteration, shards=shards)
        manifest_ref = store.put_bytes(
            artifact_key(MIGRATION_ID, iteration, "dataset", "manifest.json"),
            manifest.model_dump_json(indent=1).encode(),
            MANIFEST_MEDIA_TYPE,
        )
        built.refs[(iteration, "dataset/manifest.json")] = manifest_ref
        state.iterations.append(
            IterationRecord(
                iteration=iteration,
                dataset=manifest_ref,
                train_rows=manifest.rows,
                synthetic_rows=manifest.synthetic_rows,
                removed={"near_duplicate": 2} if iteration else {},
                spend=spend,
            )
        )
        state.iteration = iteration
        state.spend = state.spend + spend
        if iteration < 2 or finished:
            _train_and_evaluate(built, store, iteration, manifest_ref)
    if finished:
        state.status = "graduated"
    return built


def stored_responses_event(
    store: ArtifactStore,
    migration_id: str,
    spec: MigrationSpec,
    *,
    prompts: int,
    responses: int,
    prompt_prefix: str = "",
    split_stage: str = "coverage",
) -> ResponsesReady:
    """A valid `responses.ready` for iteration 0 whose test split and answers are stored under `migration_id`
    (the test split under `split_stage`, so a test can keep clear of the key the coordinator writes)."""
    test = [
        make_row(f"{prompt_prefix}describe change {i}", f"fix: change {i}", origin="coverage") for i in range(prompts)
    ]
    test_ref = store.put_bytes(artifact_key(migration_id, None, split_stage, "test.jsonl"), dump_jsonl(test))
    answers = [
        PromptResponses(
            index=i,
            prompt=row.prompt,
            responses=[
                Response(
                    text=f"fix: answer {i}.{k}", prompt_tokens=5, completion_tokens=4, finish_reason="stop", latency_s=0
                )
                for k in range(responses)
            ],
        )
        for i, row in enumerate(test)
    ]
    responses_ref = store.put_bytes(
        artifact_key(migration_id, 0, "responses", "responses.jsonl"), dump_models(answers), JSONL_MEDIA_TYPE
    )
    return ResponsesReady(
        migration_id=migration_id,
        iteration=0,
        spec=spec,
        adapter=test_ref,
        dataset=test_ref,
        test=test_ref,
        responses=responses_ref,
        prompts=prompts,
        responses_per_prompt=responses,
    )
