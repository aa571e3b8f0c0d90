"""Building a `ServiceLLM` pointed at a `ScriptedLLM`, with test-speed backoff."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from llamaduo.llm import RateLimits, ResolvedLLM, ServiceLLM
from llamaduo.store import ArtifactStore
from tests.support.scripted_llm import ScriptedLLM

TEST_KEY = "sk-test-very-secret-0123456789"


def make_service_llm(
    server: ScriptedLLM, store: ArtifactStore, *, shared_limits: bool = False, **overrides: Any
) -> ServiceLLM:
    """A client for `server` caching into `store`; `overrides` replace `ResolvedLLM` fields.

    The test session runs one event loop, so the process-wide limits of a module's shared server would carry a 429's
    pause from one test into the next: each client gets limits of its own unless `shared_limits` asks for the real
    process-wide ones.
    """
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
    llm = ResolvedLLM(**fields)
    limits = None if shared_limits else RateLimits(llm.requests_per_minute, llm.tokens_per_minute)
    return ServiceLLM(llm, store, limits=limits)
