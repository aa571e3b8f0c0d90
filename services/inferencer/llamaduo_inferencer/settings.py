"""The inferencer's settings (environment, `LLAMADUO_` prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from llamaduo.localmodel import LocalModelSettings
from llamaduo.settings import WorkerSettings


class InferencerSettings(WorkerSettings, LocalModelSettings):
    """Bus, store, scratch space, the model cache and the device; credentials and paths of remote backends."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    inference_api_key: SecretStr | None = Field(
        default=None, description="Bearer token of the tgi/openai inference server (LLAMADUO_INFERENCE_API_KEY)."
    )
    adapter_export_dir: Path | None = Field(
        default=None,
        description="A directory shared with a vLLM server: adapters to load at runtime are unpacked here "
        "(LLAMADUO_ADAPTER_EXPORT_DIR); the spec's inference.load_adapter_from is that place as the server sees it.",
    )
    part_prompts: int = Field(
        default=8, ge=1, description="Prompts per stored part of the responses (the unit a redelivered task resumes)."
    )
