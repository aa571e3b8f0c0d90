"""The inferencer's responses artifact and the judge's judgments artifact (both JSONL)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.data.rows import DatasetError

M = TypeVar("M", bound=BaseModel)


class Response(BaseModel):
    """One sampled answer of the fine-tuned model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length"]
    latency_s: float = Field(ge=0.0)


class PromptResponses(BaseModel):
    """A test prompt (by its index in the test split) and its k responses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, description="Row index in the test split.")
    prompt: str
    responses: list[Response]


class Judgment(BaseModel):
    """One judge call on one response; `error` is set (and scores are None) when it never produced valid scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, description="Row index in the test split.")
    response_index: int = Field(ge=0)
    repeat: int = Field(ge=0)
    judge_model: str
    similarity: float | None = Field(default=None, ge=1, le=100)
    precision: float | None = Field(default=None, ge=1, le=100)
    reason: str = ""
    error: str | None = None
    weighted: bool = Field(default=False, description="Scores are probability-weighted (G-Eval), not the raw integers.")


def dump_models(items: Iterable[BaseModel]) -> bytes:
    """JSONL of pydantic models."""
    return "".join(item.model_dump_json() + "\n" for item in items).encode()


def load_models(data: bytes, model: type[M], source: str) -> list[M]:
    """Parse JSONL of `model`, naming the source and line on error."""
    items: list[M] = []
    for number, line in enumerate(data.decode().splitlines(), start=1):
        if line.strip():
            try:
                items.append(model.model_validate_json(line))
            except ValueError as exc:
                raise DatasetError(f"{source} line {number}: not a valid {model.__name__}: {exc}") from exc
    return items


def ordered(items: Sequence[PromptResponses]) -> list[PromptResponses]:
    """Responses sorted by test-row index."""
    return sorted(items, key=lambda item: item.index)
