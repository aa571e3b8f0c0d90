"""Break-even: the monthly token volume above which a rented GPU running the local model beats the service LLM."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.contract import Spend

HOURS_PER_MONTH = 730.0
"""365 days x 24 hours / 12 months."""


class BreakEven(BaseModel):
    """Service-LLM and local-model cost per 1M tokens, and where a month of GPU time starts paying for itself.

    A figure is None when it cannot be measured; `verdict` then says why.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_usd_per_hour: float = Field(ge=0.0)
    hours_per_month: float = HOURS_PER_MONTH
    gpu_usd_per_month: float
    service_usd: float = Field(description="What the ledger charged the migration.")
    service_tokens: int = Field(description="Prompt and completion tokens of the ledger's service-LLM calls.")
    service_usd_per_million: float | None
    local_tokens_per_second: float | None = Field(description="Completion tokens/s measured by the inferencer.")
    local_backend: str | None = None
    local_device: str | None = None
    local_iteration: int | None = None
    local_usd_per_million: float | None
    local_capacity_tokens_per_month: float | None = Field(description="What one GPU generates in a month at full use.")
    break_even_tokens_per_month: float | None = Field(
        description="Monthly volume above which the GPU costs less than the service LLM would for the same tokens."
    )
    within_capacity: bool | None = Field(description="Whether one GPU can serve the break-even volume.")
    verdict: str
    assumptions: list[str]


def _tokens(value: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:,.2f}{suffix}"
    return f"{value:,.0f}"


def estimate_break_even(
    spend: Spend,
    tokens_per_second: float | None,
    gpu_usd_per_hour: float,
    *,
    backend: str | None = None,
    device: str | None = None,
    iteration: int | None = None,
) -> BreakEven:
    """Compare the ledger's price per 1M tokens with a GPU at `gpu_usd_per_hour` generating `tokens_per_second`.

    local $/1M = gpu_usd_per_hour / (tokens_per_second x 3600) x 1e6; break-even monthly volume =
    gpu_usd_per_hour x 730 / (service $ per token). The GPU is assumed rented for the whole month.
    """
    if gpu_usd_per_hour < 0:
        raise ValueError(f"gpu_usd_per_hour must be >= 0, got {gpu_usd_per_hour}")
    tokens = spend.prompt_tokens + spend.completion_tokens
    service = spend.usd / tokens * 1e6 if tokens > 0 and spend.usd > 0 else None
    measured = tokens_per_second if tokens_per_second is not None and tokens_per_second > 0 else None
    local = gpu_usd_per_hour / (measured * 3600) * 1e6 if measured is not None else None
    monthly = gpu_usd_per_hour * HOURS_PER_MONTH
    capacity = measured * 3600 * HOURS_PER_MONTH if measured is not None else None
    volume = monthly / service * 1e6 if service is not None else None
    within = volume <= capacity if volume is not None and capacity is not None else None
    where = f" ({backend} on {device})" if backend or device else ""
    assumptions = [
        f"The GPU is rented for the whole month ({HOURS_PER_MONTH:.0f} hours at ${gpu_usd_per_hour:.2f}/hour = "
        f"${monthly:,.2f}), busy or idle; the service LLM is paid per token.",
        "The service LLM's price per token is this migration's own ledger: the dollars of its synthesis and judging "
        "calls over their prompt and completion tokens, a blend of its input and output prices.",
        "The local model's throughput is the completion tokens per second the inferencer measured answering the "
        f"test prompts for the best iteration{where}; a serving stack with more concurrency may do better.",
    ]
    if service is None:
        verdict = (
            f"Not measurable: the ledger holds ${spend.usd:.4f} over {tokens} service-LLM tokens. Set the service "
            "LLM's prices (input_usd_per_million, output_usd_per_million) in the spec to measure it."
        )
    elif measured is None:
        verdict = "Not measurable: no inference throughput was recorded for the best iteration (inference.json)."
    elif within:
        assert volume is not None and capacity is not None
        verdict = (
            f"Above {_tokens(volume)} tokens a month the local model is cheaper than the service LLM "
            f"(one GPU at full use generates up to {_tokens(capacity)} tokens a month)."
        )
    else:
        assert local is not None
        verdict = (
            f"One GPU never breaks even at the measured throughput: at full use the local model costs "
            f"${local:,.2f} per 1M tokens against ${service:,.2f} for the service LLM. It needs more throughput "
            "(batching, a faster server) or a cheaper GPU."
        )
    return BreakEven(
        gpu_usd_per_hour=gpu_usd_per_hour,
        gpu_usd_per_month=monthly,
        service_usd=spend.usd,
        service_tokens=tokens,
        service_usd_per_million=service,
        local_tokens_per_second=measured,
        local_backend=backend,
        local_device=device,
        local_iteration=iteration,
        local_usd_per_million=local,
        local_capacity_tokens_per_month=capacity,
        break_even_tokens_per_month=volume,
        within_capacity=within,
        verdict=verdict,
        assumptions=assumptions,
    )
