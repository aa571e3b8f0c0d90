"""The migration spec: everything a user decides about one migration, carried in `migration.requested`."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from llamaduo.contract.artifacts import MIGRATION_ID_PATTERN, SHA256_PATTERN

Metric = Literal["similarity", "precision"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Section):
    """What the task is, in words; used in synthesis and judging prompts."""

    name: str = Field(min_length=1, max_length=200, description="Short name of the task.")
    description: str = Field(default="", max_length=4000, description="What a good answer does.")


class CoverageSpec(_Section):
    """The user's coverage dataset (JSONL of chat `messages`) and how to split it."""

    uri: str = Field(description="file://, s3:// or a path; `llamaduo migrate` uploads local files to the store.")
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN, description="Expected SHA-256, if known.")
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Share of rows held out for testing.")
    split_seed: int = Field(default=0, description="Seed of the train/test split.")
    use_split_field: bool = Field(
        default=True, description="Honour a per-row `split` field ('train'/'test') when every row has one."
    )
    min_train_rows: int = Field(default=4, ge=1, description="Fewer train rows than this fails the migration.")
    min_test_rows: int = Field(default=2, ge=1, description="Fewer test rows than this fails the migration.")


class BaseModelSpec(_Section):
    """The local base model to fine-tune."""

    id: str = Field(
        default="bundled:smollm2-135m-instruct",
        description="`bundled:<name>`, a local directory, or a hub id (hub ids need the weights cached locally).",
    )
    revision: str | None = Field(default=None, description="Hub revision, when `id` is a hub id.")


class LoraSpec(_Section):
    """LoRA adapter shape."""

    r: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="LoRA rank; default by model size, as in the paper's runs: 8 up to ~4B parameters, 32 above.",
    )
    alpha: int | None = Field(default=None, ge=1, description="LoRA alpha; default 2 x r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


LARGE_MODEL_PARAMETERS = 4_000_000_000
"""Above this many parameters the paper's 7-8B settings (r/alpha 32/64) apply; below, its ~2B ones (8/16)."""


def lora_shape(lora: LoraSpec, parameters: int) -> tuple[int, int]:
    """The (r, alpha) to train with: the spec's, else the paper's for a model of `parameters` parameters."""
    r = lora.r if lora.r is not None else (32 if parameters > LARGE_MODEL_PARAMETERS else 8)
    return r, lora.alpha if lora.alpha is not None else 2 * r


class TrainingSpec(_Section):
    """Fine-tuning hyperparameters (paper defaults scaled down for CPU runs)."""

    epochs: float = Field(default=3.0, gt=0.0)
    learning_rate: float = Field(default=2e-4, gt=0.0)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=16)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    lr_scheduler: str = Field(default="cosine")
    quantization: Literal["auto", "none", "4bit"] = Field(
        default="auto", description="auto: 4-bit NF4 (QLoRA) on CUDA, full precision LoRA on CPU."
    )
    seed: int = 0
    max_steps: int | None = Field(default=None, ge=1, description="Cap on optimizer steps (overrides epochs).")
    validation_fraction: float = Field(
        default=0.1,
        ge=0.0,
        le=0.5,
        description="Share of the training rows held out for validation loss (never the test split); 0 turns "
        "validation, early stopping and best-checkpoint selection off.",
    )
    eval_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps between validation passes; default: about 10 per run."
    )
    early_stopping_patience: int | None = Field(
        default=3,
        ge=1,
        description="Stop after this many validation passes without a lower loss; the best checkpoint is kept.",
    )
    packing: bool = Field(
        default=True, description="Pack rows into full sequences (padding-free): the main throughput lever."
    )
    gradient_checkpointing: bool | None = Field(
        default=None, description="Recompute activations to save memory; default: on for CUDA, off on CPU."
    )
    optimizer: Literal["adamw_torch", "paged_adamw_8bit"] = Field(
        default="adamw_torch", description="paged_adamw_8bit (bitsandbytes, CUDA) saves optimizer memory."
    )
    init_from: Literal["base", "previous_adapter"] = Field(
        default="base",
        description="base: each iteration trains from the base model on the grown dataset (the paper); "
        "previous_adapter: continue from the last iteration's adapter.",
    )
    checkpoint_steps: int = Field(
        default=50,
        ge=0,
        description="Every this many optimizer steps a checkpoint goes to the artifact store, and a redelivered "
        "task resumes from the last one; 0 turns it off.",
    )
    export_merged: bool = Field(
        default=False, description="Also store the base with the adapter merged in (full safetensors)."
    )
    num_processes: int | None = Field(
        default=None,
        ge=1,
        description="Data-parallel processes (GPUs) through `accelerate launch`; default: the trainer's "
        "LLAMADUO_TRAINER_NUM_PROCESSES, else 1.",
    )


class ServiceLLMSpec(_Section):
    """Which OpenAI-compatible service LLM to call. Unset fields fall back to the service's environment.

    The API key is never part of a spec: services read it from their environment.
    """

    base_url: HttpUrl | None = Field(default=None, description="e.g. https://api.openai.com/v1")
    model: str | None = Field(default=None, description="e.g. gpt-4o")
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    max_tokens: int = Field(default=512, ge=1)
    input_usd_per_million: float = Field(default=0.0, ge=0.0, description="Price of 1M prompt tokens.")
    output_usd_per_million: float = Field(default=0.0, ge=0.0, description="Price of 1M completion tokens.")


class InferenceSpec(_Section):
    """How the fine-tuned model answers the test prompts."""

    responses_per_prompt: int = Field(default=4, ge=1, le=64, description="k answers per test prompt (paper: 4).")
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=128, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=4, description="Stop strings; the answer ends before one.")
    batch_size: int = Field(default=16, ge=1, description="Sequences decoded together (transformers backend).")
    seed: int = Field(default=0, description="Sampling seed; with the iteration it makes answers reproducible.")
    backend: Literal["transformers", "tgi", "openai"] = Field(
        default="transformers",
        description="transformers: the inferencer runs base + adapter itself; tgi: a Text Generation Inference "
        "server with the adapter preloaded (LORA_ADAPTERS); openai: an OpenAI-compatible server (vLLM, TGI's "
        "Messages API) serving the adapter under `adapter_name`.",
    )
    endpoint: HttpUrl | None = Field(default=None, description="Base URL of the tgi or openai backend's server.")
    base_model_name: str | None = Field(
        default=None, description="openai backend: the model name the server uses for the base model."
    )
    adapter_name: str = Field(
        default="{migration_id}-iter-{iteration}",
        max_length=200,
        description="Remote backends: the adapter id (tgi) or model name (openai) the server knows this "
        "iteration's adapter by; {migration_id} and {iteration} are filled in.",
    )
    load_adapter_from: str | None = Field(
        default=None,
        max_length=1000,
        description="openai backend (vLLM with runtime LoRA updating): a path template, as the server sees it, "
        "where the inferencer unpacks the adapter (its LLAMADUO_ADAPTER_EXPORT_DIR) before asking the server to "
        "load it; {migration_id}, {iteration} and {adapter_name} are filled in.",
    )
    concurrency: int = Field(default=8, ge=1, le=512, description="Remote backends: requests in flight.")
    timeout_s: float = Field(default=120.0, gt=0.0, description="Remote backends: seconds per request.")
    max_retries: int = Field(default=4, ge=0, le=20, description="Remote backends: retries of a failed request.")
    merge_adapter: bool = Field(
        default=True, description="transformers backend: merge the LoRA weights into the base for speed."
    )
    quantization: Literal["none", "4bit"] = Field(
        default="none",
        description="transformers backend on CUDA: 4bit loads the base in NF4 (adapter kept unmerged).",
    )

    @model_validator(mode="after")
    def _check_backend(self) -> InferenceSpec:
        if self.backend != "transformers" and self.endpoint is None:
            raise ValueError(f"inference.backend {self.backend!r} needs inference.endpoint (the server's URL)")
        for name, template in (("adapter_name", self.adapter_name), ("load_adapter_from", self.load_adapter_from)):
            if template is None:
                continue
            allowed = {"migration_id", "iteration"} | ({"adapter_name"} if name == "load_adapter_from" else set())
            fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
            if not fields <= allowed:
                raise ValueError(
                    f"inference.{name} may only use {sorted(allowed)} placeholders; found {sorted(fields - allowed)}"
                )
        if self.load_adapter_from is not None and self.backend != "openai":
            raise ValueError("inference.load_adapter_from is for the openai backend (vLLM's runtime LoRA loading)")
        return self

    def adapter_name_for(self, migration_id: str, iteration: int) -> str:
        """The adapter name the remote server uses for this iteration."""
        return self.adapter_name.format(migration_id=migration_id, iteration=iteration)


def _default_thresholds() -> dict[Metric, float]:
    return {"similarity": 90.0, "precision": 90.0}


class EvaluationSpec(_Section):
    """The judge and the graduation rule."""

    judge: ServiceLLMSpec = Field(default_factory=ServiceLLMSpec)
    panel: list[ServiceLLMSpec] = Field(
        default_factory=list,
        description="More judges scoring the same responses; with any, `judge` and the panel form one panel.",
    )
    combine: Literal["mean", "strictest"] = Field(
        default="mean", description="How a panel's scores of one response become one: their mean, or the lowest."
    )
    repeats: int = Field(default=1, ge=1, le=20, description="Judgments per response, averaged (paper: 10).")
    thresholds: dict[Metric, float] = Field(
        default_factory=lambda: _default_thresholds(),
        description="Graduation when the mean of every listed metric reaches its threshold (1-100).",
    )
    gate: Literal["mean", "lower_ci"] = Field(
        default="mean",
        description="mean: the paper's rule (mean >= threshold); lower_ci: the bootstrap CI's lower bound >= it.",
    )
    min_judged: int = Field(default=1, ge=1, description="Fewer validly judged responses than this never graduate.")
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0, description="Level of the bootstrap confidence interval.")
    bootstrap_samples: int = Field(default=2000, ge=100, le=100_000)
    logprob_weighting: bool = Field(
        default=False,
        description="G-Eval style: weight each score by the judge's token probabilities, where it returns logprobs.",
    )

    @model_validator(mode="after")
    def _thresholds_in_range(self) -> EvaluationSpec:
        if not self.thresholds:
            raise ValueError("evaluation.thresholds must name at least one metric")
        for metric, value in self.thresholds.items():
            if not 1.0 <= value <= 100.0:
                raise ValueError(f"evaluation.thresholds.{metric} must be within 1..100, got {value}")
        return self


PROMPT_PLACEHOLDERS = ("task", "instruction", "response", "pairs", "focus")


def prompt_template_problem(template: str) -> str | None:
    """Why a synthesis prompt template cannot be used, or None: only plain `{name}` of the known placeholders."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as exc:
        return f"synthesis.prompt_template is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
    unknown: list[str] = []
    for name, spec, conversion in fields:
        if name is None:  # literal text after the last field
            continue
        if name not in PROMPT_PLACEHOLDERS or spec or conversion:
            # `{task.name}`, `{0}` or `{task!r}` would reach into Python objects, not just substitute text.
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if shown not in unknown:
                unknown.append(shown)
    if not unknown:
        return None
    known = ", ".join("{" + name + "}" for name in PROMPT_PLACEHOLDERS)
    return (
        f"synthesis.prompt_template has unknown placeholders {', '.join(unknown)}; the known ones are {known} "
        "(write literal braces as {{ and }})"
    )


class SynthesisSpec(_Section):
    """How the service LLM grows the training set when the model falls short."""

    generator: ServiceLLMSpec = Field(default_factory=lambda: ServiceLLMSpec(temperature=0.9))
    first_round_rows: int = Field(default=64, ge=1, description="New rows asked for in the first round.")
    growth: float = Field(default=2.0, ge=1.0, description="Each later round asks for `growth` times more.")
    pairs_per_call: int = Field(default=4, ge=1, le=32)
    max_calls_per_round: int | None = Field(default=None, ge=1, description="Cap on service-LLM calls per round.")
    prompt_template: str | None = Field(
        default=None,
        description="Generator prompt for this task, with {task}, {instruction}, {response}, {pairs} and {focus} "
        "placeholders; the paper's prompt when unset.",
    )
    targeted: bool = Field(
        default=True, description="Steer seeds and prompts toward the categories and faults the judge scored low."
    )
    near_duplicate_threshold: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="MinHash Jaccard (confirmed by ROUGE-L) above which rows duplicate.",
    )
    decontamination_ngram: int = Field(default=13, ge=4, description="Shared n-gram length that marks a test leak.")
    decontamination_threshold: float = Field(
        default=0.8, gt=0.0, le=1.0, description="MinHash similarity to a test instruction or response that is a leak."
    )
    max_row_chars: int = Field(default=8000, ge=16, description="Longer instructions or responses are dropped.")

    @model_validator(mode="after")
    def _template_is_usable(self) -> SynthesisSpec:
        # Checked when the migration is requested, not first when the synthesizer needs it rounds later.
        problem = prompt_template_problem(self.prompt_template) if self.prompt_template is not None else None
        if problem:
            raise ValueError(problem)
        return self


class BudgetSpec(_Section):
    """Limits after which the migration ends `failed`."""

    max_iterations: int = Field(default=4, ge=1, description="Fine-tune/evaluate rounds, iteration 0 included.")
    max_synthetic_rows: int | None = Field(default=None, ge=0, description="Cap on service-LLM written rows.")
    max_cost_usd: float | None = Field(
        default=None,
        ge=0.0,
        description="Hard dollar cap: the synthesizer and the judge stop calling the service LLM before the "
        "migration's ledger would pass it (budget:cost).",
    )
    plateau_iterations: int | None = Field(
        default=None,
        ge=1,
        description="Stop (plateau) when this many iterations in a row bring no metric above the best earlier "
        "iteration's confidence interval.",
    )
    deadline_minutes: float | None = Field(
        default=None, gt=0.0, description="Wall-clock limit from the request (deadline); checked continuously."
    )


class MigrationSpec(_Section):
    """Everything that defines one migration."""

    migration_id: str | None = Field(
        default=None, pattern=MIGRATION_ID_PATTERN, description="Unique id; generated when absent."
    )
    task: TaskSpec
    coverage: CoverageSpec
    base_model: BaseModelSpec = Field(default_factory=BaseModelSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    synthesis: SynthesisSpec = Field(default_factory=SynthesisSpec)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    resumed: int = Field(
        default=0, ge=0, description="How many times the migration was resumed; set by the coordinator, not by users."
    )

    def rows_for_round(self, round_index: int) -> int:
        """New synthetic rows asked for in synthesis round `round_index` (0-based): the paper's doubling."""
        return round(self.synthesis.first_round_rows * self.synthesis.growth**round_index)
