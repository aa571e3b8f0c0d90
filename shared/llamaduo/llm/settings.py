"""Where the service LLM is and how hard to push it, from the environment (`LLAMADUO_SERVICE_LLM_*`)."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaduo.contract.spec import ServiceLLMSpec

Prices = dict[str, tuple[float, float]]

# USD per 1M (input, output) tokens: OpenAI's standard-tier list prices as published on openai.com/api/pricing in
# June 2025. Prices move; set LLAMADUO_SERVICE_LLM_PRICES (or the spec's prices) rather than trusting these blindly.
DEFAULT_PRICES: Prices = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}


def price_of(model: str, prices: Prices) -> tuple[float, float] | None:
    """The (input, output) price of `model`: its own entry, else that of the longest name it extends with `-`.

    The prefix rule prices dated snapshots (`gpt-4o-2024-08-06`) like their family; a snapshot priced differently
    has an entry of its own, and `gpt-4o-mini` never falls back to `gpt-4o` because its own entry is longer.
    """
    if model in prices:
        return prices[model]
    families = [name for name in prices if model.startswith(name + "-")]
    return prices[max(families, key=len)] if families else None


class ServiceLLMSettings(BaseSettings):
    """Service-LLM defaults and transport limits of one service process; a spec may override the model part."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_SERVICE_LLM_", extra="ignore", populate_by_name=True)

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o"
    # The key comes from our own variable or, like every OpenAI tool, from OPENAI_API_KEY; never from a spec.
    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("LLAMADUO_SERVICE_LLM_API_KEY", "OPENAI_API_KEY", "api_key")
    )
    timeout_s: float = Field(default=60.0, gt=0.0)
    max_retries: int = Field(default=6, ge=0)
    max_concurrency: int = Field(default=8, ge=1)
    supports_json_schema: bool = True
    backoff_base_s: float = Field(default=0.5, ge=0.0, description="First backoff step; doubles per attempt.")
    backoff_max_s: float = Field(default=30.0, ge=0.0, description="Cap of one jittered backoff step.")
    max_retry_after_s: float = Field(default=120.0, ge=0.0, description="Longest Retry-After we agree to wait.")
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="This process's request budget per (base_url, model); None: unlimited."
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="This process's token budget per (base_url, model); None: unlimited."
    )
    prices: Prices = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="USD per 1M (input, output) tokens by model, as JSON; merged over the built-in table.",
    )
    input_usd_per_million: float = Field(
        default=0.0, ge=0.0, description="Used when neither the spec nor the price table prices the model."
    )
    output_usd_per_million: float = Field(
        default=0.0, ge=0.0, description="Used when neither the spec nor the price table prices the model."
    )

    @field_validator("prices")
    @classmethod
    def _merge_prices(cls, value: Prices) -> Prices:
        # Pricing one new model must not unprice the well-known ones, so a configured table extends the defaults.
        for model, (price_in, price_out) in value.items():
            if price_in < 0 or price_out < 0:
                raise ValueError(f"prices of {model!r} must not be negative")
        return {**DEFAULT_PRICES, **value}


class ResolvedLLM(BaseModel):
    """The settings and a spec section merged: everything one `ServiceLLM` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    model: str
    api_key: SecretStr | None = None
    timeout_s: float = 60.0
    max_retries: int = 6
    max_concurrency: int = 8
    supports_json_schema: bool = True
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    temperature: float = 0.2
    max_tokens: int = 512
    input_usd_per_million: float = 0.0
    output_usd_per_million: float = 0.0

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for the given token counts at this model's prices."""
        return (prompt_tokens * self.input_usd_per_million + completion_tokens * self.output_usd_per_million) / 1e6


def resolve(settings: ServiceLLMSettings, spec: ServiceLLMSpec | None = None) -> ResolvedLLM:
    """Merge a spec's service-LLM section over the environment's settings."""
    section = spec if spec is not None else ServiceLLMSpec()
    base_url = str(section.base_url) if section.base_url is not None else settings.base_url
    model = section.model or settings.model
    # Each price: a nonzero spec price, else the table's price of the model, else the settings' default. A price of
    # 0 in a spec is indistinguishable from "unset" once the spec has crossed the bus, so 0 falls back.
    defaults = (settings.input_usd_per_million, settings.output_usd_per_million)
    table_in, table_out = price_of(model, settings.prices) or defaults
    return ResolvedLLM(
        base_url=base_url.rstrip("/"),
        model=model,
        api_key=settings.api_key,
        timeout_s=settings.timeout_s,
        max_retries=settings.max_retries,
        max_concurrency=settings.max_concurrency,
        supports_json_schema=settings.supports_json_schema,
        backoff_base_s=settings.backoff_base_s,
        backoff_max_s=settings.backoff_max_s,
        max_retry_after_s=settings.max_retry_after_s,
        requests_per_minute=settings.requests_per_minute,
        tokens_per_minute=settings.tokens_per_minute,
        temperature=section.temperature,
        max_tokens=section.max_tokens,
        input_usd_per_million=section.input_usd_per_million or table_in,
        output_usd_per_million=section.output_usd_per_million or table_out,
    )
