"""The trainer's settings (environment, `LLAMADUO_` prefix)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from llamaduo.localmodel import LocalModelSettings
from llamaduo.settings import WorkerSettings


class TrainerSettings(WorkerSettings, LocalModelSettings):
    """Bus, store, scratch space, the model cache and the device; how many processes train in data parallel."""

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    trainer_num_processes: int = Field(
        default=1,
        ge=1,
        description="Data-parallel processes (one per GPU) unless the spec says (LLAMADUO_TRAINER_NUM_PROCESSES).",
    )
    trainer_launcher: Literal["accelerate", "torchrun"] = Field(
        default="accelerate",
        description="What starts them: `accelerate launch --multi_gpu`, or torchrun (which also runs on CPUs).",
    )
