"""Building a `ServiceLLM` pointed at a `ScriptedLLM`, with test-speed backoff."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from llamaduo.llm import ResolvedLLM, ServiceLLM
from llamaduo.store import ArtifactStore
from tests.support.scripted_llm import ScriptedLLM

TEST_KEY = "sk-test-very-secret-0123456789"


def make_service_llm(server: ScriptedLLM, store: ArtifactStore, **overrides: Any) -> ServiceLLM:
    """A client for `server` caching into `store`; `overrides` replace `ResolvedLLM` fields."""
    fields: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "scripted",
        "api_key": SecretStr(TEST_KEY),
        "timeout_s": 5.0,
        "max_retries": 4,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "input_usd_per_million": 2.0,
        "output_usd_per_million": 10.0,
    }
    fields.update(overrides)
    return ServiceLLM(ResolvedLLM(**fields), store)
