"""Where the service LLM is and how hard to push it, from the environment (`LLAMADUO_SERVICE_LLM_*`)."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaduo.contract.spec import ServiceLLMSpec


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
    input_usd_per_million: float = Field(default=0.0, ge=0.0, description="Used when the spec sets no price.")
    output_usd_per_million: float = Field(default=0.0, ge=0.0, description="Used when the spec sets no price.")


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
    # A price of 0 in a spec is indistinguishable from "unset" once the spec has crossed the bus, so 0 falls back.
    return ResolvedLLM(
        base_url=base_url.rstrip("/"),
        model=section.model or settings.model,
        api_key=settings.api_key,
        timeout_s=settings.timeout_s,
        max_retries=settings.max_retries,
        max_concurrency=settings.max_concurrency,
        supports_json_schema=settings.supports_json_schema,
        backoff_base_s=settings.backoff_base_s,
        backoff_max_s=settings.backoff_max_s,
        max_retry_after_s=settings.max_retry_after_s,
        temperature=section.temperature,
        max_tokens=section.max_tokens,
        input_usd_per_million=section.input_usd_per_million or settings.input_usd_per_million,
        output_usd_per_million=section.output_usd_per_million or settings.output_usd_per_million,
    )
