"""The service-LLM client against the scripted OpenAI-compatible server: retries, re-asks, cache, limits."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamaduo.contract.spec import ServiceLLMSpec
from llamaduo.llm import (
    Ledger,
    LLMReplyError,
    LLMRequestError,
    LLMUnavailable,
    ServiceLLM,
    ServiceLLMSettings,
    extract_json,
    resolve,
    retry_after_seconds,
)
from llamaduo.store import LocalStore
from tests.support.llm import TEST_KEY, make_service_llm
from tests.support.scripted_llm import Fault, ScriptedLLM

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "similarity": {"type": "integer", "minimum": 1, "maximum": 100},
        "precision": {"type": "integer", "minimum": 1, "maximum": 100},
        "reason": {"type": "string"},
    },
    "required": ["similarity", "precision", "reason"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Judge this."}]
SECRET = TEST_KEY


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM(judge_score=77) as scripted:
        yield scripted


@pytest.fixture
def server(shared_server: ScriptedLLM) -> ScriptedLLM:
    # One server per module (starting one costs ~0.2 s); every test starts from its initial state.
    shared_server.reset()
    return shared_server


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


make_llm = make_service_llm


async def ask(llm: ServiceLLM, nonce: int = 0, scope: str = "mig-1") -> Any:
    return await llm.chat_json(MESSAGES, schema=SCHEMA, schema_name="judgment", cache_scope=scope, nonce=nonce)


async def test_plain_reply_parses_and_costs(server: ScriptedLLM, store: LocalStore) -> None:
    async with make_llm(server, store) as llm:
        reply = await ask(llm)
    assert reply.value["similarity"] == 77
    assert reply.cached is False
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    expected = (reply.usage.prompt_tokens * 2.0 + reply.usage.completion_tokens * 10.0) / 1e6
    assert reply.usd == pytest.approx(expected)
    sent = server.requests[0]
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"] == {"name": "judgment", "schema": SCHEMA, "strict": True}


async def test_429_is_retried_after_retry_after(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(Fault.rate_limit(0.6))
    async with make_llm(server, store) as llm:
        started = time.monotonic()
        reply = await ask(llm)
        elapsed = time.monotonic() - started
    assert reply.value["precision"] == 77
    assert len(server.requests) == 2
    assert elapsed >= 0.6


async def test_503_with_http_date_retry_after(server: ScriptedLLM, store: LocalStore) -> None:
    when = email.utils.formatdate(time.time() + 1.3, usegmt=True)
    server.script(Fault.error(503, when))
    async with make_llm(server, store) as llm:
        started = time.monotonic()
        await ask(llm)
        elapsed = time.monotonic() - started
    # An HTTP date has one-second resolution: the wait is between 0.3 and 1.3 seconds.
    assert elapsed >= 0.25
    assert len(server.requests) == 2


async def test_500_then_success(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(500)
    async with make_llm(server, store) as llm:
        reply = await ask(llm)
    assert reply.value["similarity"] == 77
    assert len(server.requests) == 2
    assert reply.requests == 1  # transport retries are not separate logical requests


async def test_timeout_and_garbage_body_are_retried(store: LocalStore) -> None:
    # Its own server: the abandoned slow request lingers and must not show up in other tests' statistics.
    with ScriptedLLM(judge_score=77) as server:
        server.script(Fault.delay(1.0), Fault.garbage())
        async with make_llm(server, store, timeout_s=0.3) as llm:
            reply = await ask(llm)
        assert reply.value["similarity"] == 77
        assert len(server.requests) == 3


async def test_transient_faults_outlasting_retries_raise_unavailable(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(500, 500, 500)
    async with make_llm(server, store, max_retries=2) as llm:
        with pytest.raises(LLMUnavailable, match="HTTP 500"):
            await ask(llm)
    assert len(server.requests) == 3


async def test_400_is_not_retried(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(400)
    async with make_llm(server, store) as llm:
        with pytest.raises(LLMRequestError) as caught:
            await ask(llm)
    assert caught.value.status_code == 400
    assert caught.value.item_level
    assert len(server.requests) == 1


async def test_401_is_not_retried_and_hides_the_key(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(401)
    async with make_llm(server, store) as llm:
        with pytest.raises(LLMRequestError) as caught:
            await ask(llm)
    assert caught.value.status_code == 401
    assert not caught.value.item_level
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value) and caught.value.__cause__ is None
    assert len(server.requests) == 1


async def test_malformed_reply_is_reasked_with_the_error(server: ScriptedLLM, store: LocalStore) -> None:
    server.script("malformed")
    async with make_llm(server, store) as llm:
        reply = await ask(llm)
    assert reply.value["similarity"] == 77
    assert reply.requests == 2
    assert len(server.requests) == 2
    reask = server.requests[1]["messages"]
    assert reask[0] == MESSAGES[0]
    assert reask[1]["role"] == "assistant" and "oops" in reask[1]["content"]
    assert reask[2]["role"] == "user" and "could not be used" in reask[2]["content"]
    first, second = (len(r["messages"]) for r in server.requests)
    assert second == first + 2


async def test_malformed_forever_raises_reply_error_with_spend(server: ScriptedLLM, store: LocalStore) -> None:
    server.script("malformed", "malformed", "malformed")
    async with make_llm(server, store) as llm:
        with pytest.raises(LLMReplyError) as caught:
            await ask(llm)
    assert len(server.requests) == 3
    assert caught.value.spend.calls == 3
    assert caught.value.spend.prompt_tokens > 0


async def test_failing_validator_triggers_reask(server: ScriptedLLM, store: LocalStore) -> None:
    seen: list[int] = []

    def validate(data: dict[str, Any]) -> int:
        seen.append(data["similarity"])
        if len(seen) == 1:
            raise ValueError("similarity must be above 90")
        return int(data["similarity"])

    async with make_llm(server, store) as llm:
        reply = await llm.chat_json(
            MESSAGES, schema=SCHEMA, schema_name="judgment", validate=validate, cache_scope="mig-1"
        )
    assert reply.value == 77
    assert "similarity must be above 90" in server.requests[1]["messages"][-1]["content"]


async def test_cache_hit_makes_no_http_call(server: ScriptedLLM, store: LocalStore, tmp_path: Path) -> None:
    ledger = Ledger()
    async with make_llm(server, store) as llm:
        first = await ask(llm)
        second = await ask(llm)
        ledger.add(first)
        ledger.add(second)
        other_nonce = await ask(llm, nonce=1)
    assert len(server.requests) == 2
    assert second.cached and not first.cached and not other_nonce.cached
    assert second.value == first.value and second.usage == first.usage
    # A redelivered task runs in a new client (another replica): same store, same answer, no HTTP.
    async with make_llm(server, store) as again:
        replay = await ask(again)
    assert replay.cached and len(server.requests) == 2
    assert ledger.spend.calls == 2 and ledger.spend.cached_calls == 1
    assert ledger.spend.prompt_tokens == 2 * first.usage.prompt_tokens
    cache_files = list((tmp_path / "store" / "llm-cache" / "mig-1").glob("*.json"))
    assert len(cache_files) == 2
    assert all(SECRET not in path.read_text() for path in cache_files)


async def test_cache_replays_reasks_with_their_full_spend(server: ScriptedLLM, store: LocalStore) -> None:
    server.script("malformed")
    async with make_llm(server, store) as llm:
        first = await ask(llm)
        replay = await ask(llm)
    assert len(server.requests) == 2
    assert replay.cached and replay.requests == 2 and replay.cached_requests == 2
    assert replay.usage == first.usage and replay.usd == first.usd


async def test_cache_scope_must_be_a_plain_name(server: ScriptedLLM, store: LocalStore) -> None:
    async with make_llm(server, store) as llm:
        with pytest.raises(ValueError, match="cache_scope"):
            await ask(llm, scope="../escape")


async def test_concurrency_limit_is_respected(server: ScriptedLLM, store: LocalStore) -> None:
    server.latency_s = 0.15
    async with make_llm(server, store, max_concurrency=3) as llm:
        replies = await asyncio.gather(*(ask(llm, nonce=n) for n in range(9)))
    assert len(replies) == 9
    assert server.max_in_flight == 3


async def test_falls_back_when_server_refuses_json_schema(store: LocalStore) -> None:
    with ScriptedLLM(judge_score=64, supports_json_schema=False) as server:
        async with make_llm(server, store) as llm:
            reply = await ask(llm)
            await ask(llm, nonce=1)
        assert reply.value["similarity"] == 64
        bodies = server.requests
    # One refused structured request, then prompted JSON for this and every later call.
    assert len(bodies) == 3
    assert "response_format" in bodies[0]
    assert "response_format" not in bodies[1] and "response_format" not in bodies[2]
    assert bodies[1]["messages"][0]["role"] == "system" and "JSON Schema" in bodies[1]["messages"][0]["content"]


async def test_supports_json_schema_false_never_sends_response_format(server: ScriptedLLM, store: LocalStore) -> None:
    async with make_llm(server, store, supports_json_schema=False) as llm:
        reply = await ask(llm)
    assert reply.value["similarity"] == 77
    assert "response_format" not in server.requests[0]


def test_extract_json_tolerates_prose_and_fences() -> None:
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Sure!\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert extract_json("noise {broken then [1, 2] tail") == [1, 2]
    with pytest.raises(ValueError):
        extract_json("no json here")


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after_seconds({"Retry-After": future}) or 0) <= 30
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"Retry-After": "soon"}) is None


def test_resolve_spec_overrides_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_MODEL", "env-model")
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_MAX_CONCURRENCY", "3")
    settings = ServiceLLMSettings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    plain = resolve(settings, ServiceLLMSpec())
    assert plain.model == "env-model" and plain.base_url == "https://api.openai.com/v1"
    assert plain.max_concurrency == 3
    spec = ServiceLLMSpec(
        base_url="http://127.0.0.1:9/v1/",  # type: ignore[arg-type]
        model="spec-model",
        temperature=0.9,
        max_tokens=77,
        input_usd_per_million=5.0,
    )
    merged = resolve(settings, spec)
    assert merged.base_url == "http://127.0.0.1:9/v1"
    assert (merged.model, merged.temperature, merged.max_tokens) == ("spec-model", 0.9, 77)
    assert merged.input_usd_per_million == 5.0
    assert SECRET not in repr(merged)


def test_own_key_variable_wins_over_openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_API_KEY", "sk-ours")
    key = ServiceLLMSettings().api_key
    assert key is not None and key.get_secret_value() == "sk-ours"
