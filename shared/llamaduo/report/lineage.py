"""Lineage: what an iteration's adapter came from, as one JSON document stored beside its artifacts.

`build_lineage` is a pure, synchronous function of the store, the migration state and the iteration: it reads the
stage outputs that exist and records the ones that do not as absent. `write_lineage` stores the result under
`iter-NNNN/lineage/lineage.json`; the same inputs always give the same bytes, so writing it again is harmless.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaduo.contract import ArtifactRef, MetricSummary, MigrationSpec, Spend
from llamaduo.contract.spec import Metric
from llamaduo.data import DatasetManifest
from llamaduo.report.stages import (
    ADAPTER,
    EVALUATION,
    INFERENCE,
    JUDGMENTS,
    LINEAGE,
    RESPONSES,
    SYNTHESIS,
    TRAINING,
    IterationFiles,
)
from llamaduo.state import Decision, IterationRecord, MigrationState
from llamaduo.store import ArtifactStore

LINEAGE_SCHEMA_VERSION: Literal[1] = 1


class _Link(BaseModel):
    # `ignore`: sections are validated from the workers' summaries, which carry more than the lineage keeps.
    model_config = ConfigDict(extra="ignore", frozen=True)


class SpecLink(_Link):
    """The migration spec the iteration ran under, and the sha256 of its canonical JSON."""

    sha256: str
    spec: MigrationSpec


class ShardLink(_Link):
    """One training shard of the iteration's dataset."""

    uri: str
    sha256: str
    size: int
    rows: int
    origin: Literal["coverage", "synthetic"]
    round_index: int | None = None


class DatasetLink(_Link):
    """The training set: its manifest and every shard (None when the manifest could not be read)."""

    manifest: ArtifactRef
    rows: int
    synthetic_rows: int
    removed: dict[str, int] = Field(default_factory=dict)
    shards: list[ShardLink] | None = None


class SynthesisLink(_Link):
    """The synthesis round that grew this iteration's dataset (iterations >= 1)."""

    summary: ArtifactRef
    round_index: int
    generator_model: str | None = Field(description="The spec's generator model; None: the synthesizer's default.")
    prompt_template_source: Literal["spec", "synthesizer default"]
    prompt_template_sha256: str | None = Field(description="sha256 of the spec's template; None for the default.")
    prompt_template: str | None = None
    targeted: bool
    asked: int | None = None
    kept: int | None = None
    calls: int | None = None
    failed_calls: int | None = None
    withheld_prompts: int | None = None
    removed: dict[str, int] = Field(default_factory=dict)
    spend: Spend | None = None
    budget_exhausted: bool = Field(default=False, description="The round stopped early at the dollar cap.")


class LossPoint(_Link):
    """The training loss logged at one optimizer step."""

    step: int
    loss: float


class TrainingLink(_Link):
    """The fine-tune: its configuration, what it measured, and the adapter it wrote."""

    adapter: ArtifactRef | None = None
    result: ArtifactRef | None = Field(default=None, description="training.json")
    base_model: str
    base_model_revision: str | None = None
    config_source: Literal["training.json", "spec"]
    lora: dict[str, Any]
    training: dict[str, Any]
    precision: str | None = None
    rows: int | None = None
    steps: int | None = None
    train_loss: float | None = None
    seconds: float | None = None
    tokens: int | None = None
    tokens_per_second: float | None = None
    loss_history: list[LossPoint] = Field(default_factory=list)


class InferenceLink(_Link):
    """The fine-tuned model's answers to the test prompts and the throughput measured producing them."""

    responses: ArtifactRef | None = None
    summary: ArtifactRef | None = Field(default=None, description="inference.json")
    backend: str | None = None
    device: str | None = None
    prompts: int | None = None
    prompts_generated: int | None = None
    responses_per_prompt: int | None = None
    completion_tokens_generated: int | None = None
    seconds: float | None = None
    completion_tokens_per_second: float | None = None


class EvaluationLink(_Link):
    """The judges' scores of the answers, against the thresholds of the spec."""

    judgments: ArtifactRef | None = None
    summary: ArtifactRef | None = Field(default=None, description="evaluation.json")
    judges: list[str]
    judges_source: Literal["evaluation.json", "spec"]
    scores: dict[Metric, MetricSummary] = Field(default_factory=dict)
    thresholds: dict[Metric, float]
    gate: str
    failed_judgments: int = 0
    spend: Spend | None = None
    agreement: dict[str, Any] | None = None
    budget_exhausted: bool = Field(default=False, description="Judging stopped early at the dollar cap.")
    skipped_for_budget: int | None = None


class Lineage(BaseModel):
    """Everything one iteration's adapter came from, with the hash of each input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = LINEAGE_SCHEMA_VERSION
    migration_id: str
    iteration: int = Field(ge=0)
    spec: SpecLink
    test: ArtifactRef | None = Field(description="The held-out test split the model was evaluated on.")
    dataset: DatasetLink
    synthesis: SynthesisLink | None = None
    training: TrainingLink | None = None
    inference: InferenceLink | None = None
    evaluation: EvaluationLink | None = None
    decision: Decision | None = None
    spend: Spend = Field(description="Service-LLM spend charged to the iteration (its synthesis and judging).")
    absent: list[str] = Field(default_factory=list, description="Expected outputs (`stage/name`) not in the store.")
    problems: list[str] = Field(default_factory=list, description="Outputs present but unreadable.")


def spec_sha256(spec: MigrationSpec) -> str:
    """sha256 of the spec's canonical JSON (keys sorted, no whitespace)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _dataset(files: IterationFiles, record: IterationRecord) -> DatasetLink:
    manifest = files.read(record.dataset, DatasetManifest.model_validate_json, "dataset/manifest.json")
    shards = None
    if manifest is not None:
        shards = [
            ShardLink(
                uri=shard.ref.uri,
                sha256=shard.ref.sha256,
                size=shard.ref.size,
                rows=shard.rows,
                origin=shard.origin,
                round_index=shard.round_index,
            )
            for shard in manifest.shards
        ]
    return DatasetLink(
        manifest=record.dataset,
        rows=record.train_rows,
        synthetic_rows=record.synthetic_rows,
        removed=record.removed,
        shards=shards,
    )


def _validated(files: IterationFiles, model: type[_Link], values: dict[str, Any], what: str) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        files.problems.append(f"{what} does not have the expected fields: {exc.errors()[0]['msg']}")
        return None


def _synthesis(files: IterationFiles, spec: MigrationSpec, iteration: int) -> SynthesisLink | None:
    if iteration == 0:
        return None  # iteration 0 trains on the coverage train split only: there is nothing to synthesize
    found = files.json(SYNTHESIS)
    if found is None:
        return None
    ref, summary = found
    template = spec.synthesis.prompt_template
    link: SynthesisLink | None = _validated(
        files,
        SynthesisLink,
        {
            **summary,
            "summary": ref,
            "round_index": iteration - 1,
            "generator_model": spec.synthesis.generator.model,
            "prompt_template_source": "spec" if template is not None else "synthesizer default",
            "prompt_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template is not None else None,
            "prompt_template": template,
            "targeted": spec.synthesis.targeted,
        },
        SYNTHESIS.label,
    )
    return link


def _loss_history(raw: object) -> list[dict[str, float]]:
    if not isinstance(raw, list):
        return []
    return [
        {"step": entry["step"], "loss": entry["loss"]}
        for entry in raw
        if isinstance(entry, dict)
        and isinstance(entry.get("step"), int | float)
        and isinstance(entry.get("loss"), int | float)
    ]


def _training(files: IterationFiles, spec: MigrationSpec, record: IterationRecord) -> TrainingLink | None:
    adapter = record.adapter or files.head(ADAPTER)
    found = files.json(TRAINING)
    if adapter is None and found is None:
        return None
    base = {
        "adapter": adapter,
        "base_model": spec.base_model.id,
        "base_model_revision": spec.base_model.revision,
        "config_source": "spec",
        "lora": spec.lora.model_dump(mode="json"),
        "training": spec.training.model_dump(mode="json"),
    }
    if found is not None:
        ref, summary = found
        trained_on = summary.get("dataset")
        if isinstance(trained_on, dict) and trained_on.get("sha256") != record.dataset.sha256:
            files.problems.append(
                f"{TRAINING.label} names dataset sha256 {trained_on.get('sha256')}, "
                f"but the state records {record.dataset.sha256}"
            )
        link: TrainingLink | None = _validated(
            files,
            TrainingLink,
            {
                **base,
                **summary,
                "adapter": adapter,
                "result": ref,
                "config_source": "training.json",
                "loss_history": _loss_history(summary.get("log_history")),
            },
            TRAINING.label,
        )
        if link is not None:
            return link
    return TrainingLink.model_validate(base)


def _inference(files: IterationFiles) -> InferenceLink | None:
    responses = files.head(RESPONSES)
    found = files.json(INFERENCE)
    if responses is None and found is None:
        return None
    values: dict[str, Any] = {"responses": responses}
    if found is not None:
        values = {**found[1], **values, "summary": found[0]}
    link: InferenceLink | None = _validated(files, InferenceLink, values, INFERENCE.label)
    return link or InferenceLink(responses=responses)


def _evaluation(files: IterationFiles, spec: MigrationSpec, record: IterationRecord) -> EvaluationLink | None:
    judgments = record.judgments or files.head(JUDGMENTS)
    found = files.json(EVALUATION)
    if judgments is None and found is None and record.scores is None:
        return None
    evaluation = spec.evaluation
    default = "(the judge service's default model)"
    spec_judges = [judge.model or default for judge in [evaluation.judge, *evaluation.panel]]
    values: dict[str, Any] = {
        "judgments": judgments,
        "judges": spec_judges,
        "judges_source": "spec",
        "scores": record.scores or {},
        "thresholds": evaluation.thresholds,
        "gate": evaluation.gate,
        "failed_judgments": record.failed_judgments,
    }
    if found is not None:
        ref, summary = found
        judges = summary.get("judges") or ([summary["judge_model"]] if summary.get("judge_model") else None)
        values.update(
            summary=ref,
            spend=summary.get("spend"),
            agreement=summary.get("agreement"),
            budget_exhausted=summary.get("budget_exhausted", False),
            skipped_for_budget=summary.get("skipped_for_budget"),
        )
        if judges:
            values.update(judges=judges, judges_source="evaluation.json")
        if not record.scores and isinstance(summary.get("scores"), dict):
            values["scores"] = summary["scores"]
            values["failed_judgments"] = summary.get("failed", record.failed_judgments)
    link: EvaluationLink | None = _validated(files, EvaluationLink, values, EVALUATION.label)
    if link is None:
        fallback = {key: values[key] for key in ("judgments", "thresholds", "gate", "failed_judgments")}
        link = EvaluationLink.model_validate(
            {**fallback, "judges": spec_judges, "judges_source": "spec", "scores": record.scores or {}}
        )
    return link


def build_lineage(store: ArtifactStore, state: MigrationState, iteration: int) -> Lineage:
    """The lineage of `iteration`: spec, dataset and shards, synthesis, training, inference, evaluation, decision.

    Outputs of stages that have not run (or never will) are listed in `absent`; outputs that exist but cannot be
    read (checksum mismatch, malformed JSON) in `problems`. Raises `ValueError` if the iteration never started.
    """
    record = state.record(iteration)
    if record is None:
        raise ValueError(f"migration {state.migration_id} has no iteration {iteration}")
    files = IterationFiles(store, state.migration_id, iteration)
    spec = state.spec
    dataset = _dataset(files, record)
    synthesis = _synthesis(files, spec, iteration)
    training = _training(files, spec, record)
    inference = _inference(files)
    evaluation = _evaluation(files, spec, record)
    return Lineage(
        migration_id=state.migration_id,
        iteration=iteration,
        spec=SpecLink(sha256=spec_sha256(spec), spec=spec),
        test=state.test,
        dataset=dataset,
        synthesis=synthesis,
        training=training,
        inference=inference,
        evaluation=evaluation,
        decision=record.decision,
        spend=record.spend,
        absent=files.absent,
        problems=files.problems,
    )


def write_lineage(store: ArtifactStore, state: MigrationState, iteration: int) -> ArtifactRef:
    """Build the lineage of `iteration` and store it at `iter-NNNN/lineage/lineage.json`; return its reference."""
    lineage = build_lineage(store, state, iteration)
    data = lineage.model_dump_json(indent=1).encode()
    return store.put_bytes(LINEAGE.key(state.migration_id, iteration), data, LINEAGE.media_type)
