"""The judge's settings (environment: `LLAMADUO_*` and `LLAMADUO_SERVICE_LLM_*`)."""

from __future__ import annotations

from pydantic import Field

from llamaduo.llm import ServiceLLMSettings
from llamaduo.settings import WorkerSettings


class JudgeSettings(WorkerSettings):
    """Bus, store and logging, plus where the service LLM is."""

    service_llm: ServiceLLMSettings = Field(default_factory=ServiceLLMSettings)
