"""Lineage: each adapter is linked to the exact inputs it came from; stages that never ran are recorded as absent."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from llamaduo.report import Lineage, build_lineage, write_lineage
from llamaduo.report.lineage import spec_sha256
from llamaduo.store import LocalStore, artifact_key, path_from_file_uri
from tests.support.migration_artifacts import (
    JUDGE_SPEND,
    LOSSES,
    MIGRATION_ID,
    SYNTHESIS_SPEND,
    TEMPLATE,
    TOKENS_PER_SECOND,
    build_migration,
)

LATER_STAGES = [
    "adapter/adapter.tar",
    "adapter/training.json",
    "responses/responses.jsonl",
    "responses/inference.json",
    "judgments/judgments.jsonl",
    "judgments/evaluation.json",
]


def test_a_graduated_iteration_links_every_input_by_hash(store: LocalStore) -> None:
    built = build_migration(store)
    state, refs = built.state, built.refs
    lineage = build_lineage(store, state, 2)

    canonical = json.dumps(state.spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert lineage.spec.sha256 == spec_sha256(state.spec) == hashlib.sha256(canonical.encode()).hexdigest()
    assert lineage.spec.spec == state.spec
    assert lineage.test == state.test

    # The dataset: the manifest the state recorded, and every shard with its own hash, rows and origin.
    assert lineage.dataset.manifest == refs[(2, "dataset/manifest.json")]
    assert lineage.dataset.shards is not None
    assert [(s.sha256, s.rows, s.origin, s.round_index) for s in lineage.dataset.shards] == [
        (shard.ref.sha256, shard.rows, shard.origin, shard.round_index) for shard in built.shards[2]
    ]
    assert [s.origin for s in lineage.dataset.shards] == ["coverage", "synthetic", "synthetic"]
    assert state.train is not None and lineage.dataset.shards[0].sha256 == state.train.sha256
    assert (lineage.dataset.rows, lineage.dataset.synthetic_rows) == (36, 30)

    synthesis = lineage.synthesis
    assert synthesis is not None
    assert synthesis.summary == refs[(2, "dataset/synthesis.json")]
    assert synthesis.round_index == 1 and synthesis.generator_model == "gpt-4o"
    assert synthesis.prompt_template_source == "spec"
    assert synthesis.prompt_template_sha256 == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    assert synthesis.spend == SYNTHESIS_SPEND[2] and synthesis.kept == 20 and synthesis.asked == 22
    assert synthesis.removed == {"near_duplicate": 2}

    training = lineage.training
    assert training is not None
    assert training.adapter == state.iterations[2].adapter == refs[(2, "adapter/adapter.tar")]
    assert training.result == refs[(2, "adapter/training.json")]
    assert training.config_source == "training.json"
    assert training.base_model == "bundled:smollm2-135m-instruct"
    assert (training.precision, training.steps, training.train_loss) == ("fp32-lora", 30, LOSSES[2])
    assert training.tokens_per_second == 320.0 and training.rows == 36
    assert training.training["learning_rate"] == 1e-4 and training.lora["r"] == state.spec.lora.r  # None: by model size
    assert [(p.step, p.loss) for p in training.loss_history] == [(5, LOSSES[2] + 0.5), (10, LOSSES[2])]

    inference = lineage.inference
    assert inference is not None
    assert inference.responses == refs[(2, "responses/responses.jsonl")]
    assert inference.summary == refs[(2, "responses/inference.json")]
    assert (inference.backend, inference.device) == ("transformers", "cpu")
    assert inference.completion_tokens_per_second == TOKENS_PER_SECOND[2]

    evaluation = lineage.evaluation
    assert evaluation is not None
    assert evaluation.judgments == state.iterations[2].judgments == refs[(2, "judgments/judgments.jsonl")]
    assert evaluation.summary == refs[(2, "judgments/evaluation.json")]
    assert evaluation.judges == ["gpt-4o-mini"] and evaluation.judges_source == "evaluation.json"
    assert evaluation.scores == state.iterations[2].scores
    assert evaluation.scores["similarity"].ci_low == 80.5
    assert evaluation.thresholds == {"similarity": 85.0, "precision": 80.0}
    assert evaluation.failed_judgments == 1 and evaluation.spend == JUDGE_SPEND

    assert lineage.decision == "graduated"
    assert lineage.spend == SYNTHESIS_SPEND[2] + JUDGE_SPEND
    assert lineage.absent == [] and lineage.problems == []


def test_iteration_zero_has_no_synthesis_and_does_not_call_it_absent(store: LocalStore) -> None:
    state = build_migration(store).state
    lineage = build_lineage(store, state, 0)
    assert lineage.synthesis is None
    assert lineage.dataset.shards is not None and [s.origin for s in lineage.dataset.shards] == ["coverage"]
    assert lineage.decision == "need_more_data"
    assert lineage.absent == []


def test_stages_that_never_ran_are_recorded_as_absent(store: LocalStore) -> None:
    state = build_migration(store, finished=False).state
    lineage = build_lineage(store, state, 2)
    assert lineage.synthesis is not None and lineage.dataset.shards is not None
    assert lineage.training is None and lineage.inference is None and lineage.evaluation is None
    assert lineage.decision is None
    assert lineage.absent == LATER_STAGES


def test_an_adapter_trained_but_not_yet_evaluated_is_found_in_the_store(store: LocalStore) -> None:
    built = build_migration(store)
    state = built.state
    record = state.iterations[2]
    # As the state stands between model.trained and evaluation.completed: the coordinator has no adapter yet.
    record.adapter = record.judgments = record.scores = record.decision = None
    for name in ("judgments.jsonl", "evaluation.json"):
        path_from_file_uri(store.uri_for(artifact_key(MIGRATION_ID, 2, "judgments", name))).unlink()
    lineage = build_lineage(store, state, 2)
    assert lineage.training is not None and lineage.training.adapter == built.refs[(2, "adapter/adapter.tar")]
    assert lineage.evaluation is None
    assert lineage.absent == ["judgments/judgments.jsonl", "judgments/evaluation.json"]


def test_unreadable_artifacts_are_problems_not_errors(store: LocalStore) -> None:
    built = build_migration(store)
    manifest = path_from_file_uri(built.refs[(1, "dataset/manifest.json")].uri)
    manifest.write_text(manifest.read_text().replace('"rows": 6', '"rows": 7'))  # no longer its recorded sha256
    training = path_from_file_uri(built.refs[(1, "adapter/training.json")].uri)
    training.write_text("{not json")
    lineage = build_lineage(store, built.state, 1)
    assert lineage.dataset.shards is None and lineage.dataset.manifest == built.refs[(1, "dataset/manifest.json")]
    assert any("dataset/manifest.json unreadable" in problem and "sha256" in problem for problem in lineage.problems)
    assert any(problem.startswith("adapter/training.json unreadable") for problem in lineage.problems)
    # Without its training.json the configuration comes from the spec; the adapter is still linked.
    assert lineage.training is not None and lineage.training.config_source == "spec"
    assert lineage.training.adapter == built.refs[(1, "adapter/adapter.tar")]


def test_a_training_result_for_another_dataset_is_flagged(store: LocalStore) -> None:
    built = build_migration(store)
    other = built.refs[(0, "dataset/manifest.json")]
    key = artifact_key(MIGRATION_ID, 1, "adapter", "training.json")
    summary = json.loads(store.read_bytes(built.refs[(1, "adapter/training.json")]))
    store.put_bytes(key, json.dumps({**summary, "dataset": other.model_dump()}).encode())
    lineage = build_lineage(store, built.state, 1)
    assert [p for p in lineage.problems if "names dataset sha256" in p] == [
        f"adapter/training.json names dataset sha256 {other.sha256}, but the state records "
        f"{built.refs[(1, 'dataset/manifest.json')].sha256}"
    ]


def test_write_lineage_stores_it_beside_the_iteration_and_is_idempotent(store: LocalStore) -> None:
    state = build_migration(store).state
    ref = write_lineage(store, state, 1)
    assert ref.uri == store.uri_for(artifact_key(MIGRATION_ID, 1, "lineage", "lineage.json"))
    assert ref.media_type == "application/vnd.llamaduo.lineage+json"
    stored = Lineage.model_validate_json(store.read_bytes(ref))
    assert stored == build_lineage(store, state, 1)
    assert write_lineage(store, state, 1).sha256 == ref.sha256  # same inputs, same bytes


def test_an_iteration_that_never_started_is_an_error(store: LocalStore) -> None:
    state = build_migration(store, finished=False).state
    with pytest.raises(ValueError, match="has no iteration 3"):
        build_lineage(store, state, 3)


def test_lineage_needs_no_matplotlib() -> None:
    # The coordinator writes lineage and its image carries no plotting library.
    code = "import sys, llamaduo.report.lineage, llamaduo.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
