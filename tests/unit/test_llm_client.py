"""The service-LLM client against the scripted OpenAI-compatible server: retries, re-asks, cache, limits."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamaduo.contract.spec import ServiceLLMSpec
from llamaduo.llm import (
    DEFAULT_PRICES,
    Ledger,
    LLMReplyError,
    LLMRequestError,
    LLMUnavailable,
    ServiceLLM,
    ServiceLLMSettings,
    TokenLogprob,
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


make_llm = make_service_llm


async def ask(llm: ServiceLLM, nonce: int = 0, scope: str = "mig-1", top_logprobs: int | None = None) -> Any:
    return await llm.chat_json(
        MESSAGES, schema=SCHEMA, schema_name="judgment", cache_scope=scope, nonce=nonce, top_logprobs=top_logprobs
    )


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
    assert caught.value.reason == "bad_request"
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_key_fails_fast_naming_the_variable_not_the_key(
    server: ScriptedLLM, store: LocalStore, status: int
) -> None:
    server.script(status)
    async with make_llm(server, store) as llm:
        started = time.monotonic()
        with pytest.raises(LLMRequestError) as caught:
            await ask(llm)
        elapsed = time.monotonic() - started
    error = caught.value
    assert (error.status_code, error.reason) == (status, "invalid_api_key")
    assert not error.item_level
    message = str(error)
    assert "rejected the API key" in message
    assert "LLAMADUO_SERVICE_LLM_API_KEY" in message and "OPENAI_API_KEY" in message
    assert server.base_url in message
    assert SECRET not in message and SECRET not in repr(error) and error.__cause__ is None
    assert len(server.requests) == 1 and elapsed < 1.0  # no retry, no backoff


async def test_missing_key_is_reported_as_missing(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(401)
    async with make_llm(server, store, api_key=None) as llm:
        with pytest.raises(LLMRequestError) as caught:
            await ask(llm)
    assert caught.value.reason == "invalid_api_key"
    assert "carried no API key" in str(caught.value)
    assert "LLAMADUO_SERVICE_LLM_API_KEY" in str(caught.value)


async def test_404_names_the_model_and_base_url(server: ScriptedLLM, store: LocalStore) -> None:
    server.script(404)
    async with make_llm(server, store, model="gpt-9-imaginary") as llm:
        with pytest.raises(LLMRequestError) as caught:
            await ask(llm)
    assert (caught.value.status_code, caught.value.reason) == (404, "unknown_model")
    assert "'gpt-9-imaginary'" in str(caught.value) and server.base_url in str(caught.value)
    assert len(server.requests) == 1


def test_request_error_reason_defaults_from_the_status() -> None:
    assert LLMRequestError("x", 401).reason == "invalid_api_key"
    assert LLMRequestError("x", 404).reason == "unknown_model"
    assert LLMRequestError("x", 422).reason == "bad_request"
    assert LLMRequestError("x", 400, reason="custom").reason == "custom"


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


async def test_rerun_from_the_cache_costs_no_new_dollars(server: ScriptedLLM, store: LocalStore) -> None:
    first_run, second_run = Ledger(), Ledger()
    async with make_llm(server, store) as llm:
        for nonce in range(3):
            first_run.add(await ask(llm, nonce=nonce))
    async with make_llm(server, store) as again:
        for nonce in range(3):
            second_run.add(await ask(again, nonce=nonce))
    assert len(server.requests) == 3
    paid, replayed = first_run.spend, second_run.spend
    assert paid.usd > 0 and paid.cached_usd == 0
    # The output's full, once-paid cost is still reported; none of it is new.
    assert replayed.usd == paid.usd
    assert replayed.cached_usd == replayed.usd
    assert replayed.usd - replayed.cached_usd == 0.0


async def test_cached_usd_counts_exactly_the_cached_attempts(server: ScriptedLLM, store: LocalStore) -> None:
    server.script("malformed")
    async with make_llm(server, store) as llm:
        first = await ask(llm)  # a malformed attempt and a valid one, both cached
    assert first.requests == 2 and first.cached_usd == 0

    def reject_first_sight(data: dict[str, Any]) -> int:
        if data["similarity"] == 77:
            raise ValueError("not 77 again")
        return int(data["similarity"])

    server.judge_score = 55
    async with make_llm(server, store) as llm:
        # The same two attempts come from the cache; the validator refuses the second, so a third is paid for now.
        second = await llm.chat_json(
            MESSAGES, schema=SCHEMA, schema_name="judgment", validate=reject_first_sight, cache_scope="mig-1"
        )
    assert second.value == 55 and second.requests == 3 and second.cached_requests == 2
    assert second.cached_usd == pytest.approx(first.usd)
    assert 0 < second.cached_usd < second.usd
    assert second.spend.cached_usd == second.cached_usd


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


async def test_concurrent_refusals_of_json_schema_all_fall_back(store: LocalStore) -> None:
    with ScriptedLLM(judge_score=64, latency_s=0.1, supports_json_schema=False) as server:
        async with make_llm(server, store, max_concurrency=4) as llm:
            replies = await asyncio.gather(*(ask(llm, nonce=n) for n in range(4)))
    # Four requests were refused at once; each falls back on its own, none is lost to a flag another one flipped.
    assert [reply.value["similarity"] for reply in replies] == [64] * 4


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


async def test_logprobs_are_requested_returned_and_cached(server: ScriptedLLM, store: LocalStore) -> None:
    async with make_llm(server, store) as llm:
        reply = await ask(llm, top_logprobs=5)
        plain = await ask(llm)  # not served the entry with logprobs, nor it the one without
    sent = server.requests[0]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 5
    assert "logprobs" not in server.requests[1] and plain.logprobs is None and not plain.cached
    assert reply.logprobs is not None
    assert "".join(t.token for t in reply.logprobs) == reply.text
    scores = [t for t in reply.logprobs if t.token.strip() == "77"]
    assert len(scores) == 2  # similarity and precision
    for token in scores:
        assert isinstance(token, TokenLogprob)
        assert token.logprob == pytest.approx(math.log(0.6))
        assert [alt.strip() for alt, _ in token.top] == ["77", "72", "82", "67", "87"]
        expected = sum(int(alt) * math.exp(lp) for alt, lp in token.top)
        assert expected == pytest.approx(77.0)
    async with make_llm(server, store) as again:
        replay = await ask(again, top_logprobs=5)
    assert replay.cached and replay.logprobs == reply.logprobs
    assert len(server.requests) == 2


async def test_server_without_logprobs_gives_none(store: LocalStore) -> None:
    with ScriptedLLM(judge_score=60, supports_logprobs=False) as server:
        async with make_llm(server, store) as llm:
            reply = await ask(llm, top_logprobs=3)
        assert reply.value["similarity"] == 60 and reply.logprobs is None


async def test_server_refusing_logprobs_is_asked_without_them(server: ScriptedLLM, store: LocalStore) -> None:
    server.script("refuse_logprobs")
    async with make_llm(server, store) as llm:
        reply = await ask(llm, top_logprobs=3)
        await ask(llm, nonce=1, top_logprobs=3)
    assert reply.value["similarity"] == 77 and reply.logprobs is None
    assert [body.get("logprobs") for body in server.requests] == [True, None, None]


async def test_top_logprobs_must_be_in_range(server: ScriptedLLM, store: LocalStore) -> None:
    async with make_llm(server, store) as llm:
        with pytest.raises(ValueError, match="top_logprobs"):
            await ask(llm, top_logprobs=21)


def test_price_table_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_PRICES", '{"house-model": [1.0, 2.0], "gpt-4o": [3, 12]}')
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_INPUT_USD_PER_MILLION", "7")
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_OUTPUT_USD_PER_MILLION", "8")
    settings = ServiceLLMSettings()
    # A configured table extends the built-in one and overrides its entries.
    assert settings.prices["house-model"] == (1.0, 2.0) and settings.prices["gpt-4o"] == (3.0, 12.0)
    assert settings.prices["gpt-4o-mini"] == DEFAULT_PRICES["gpt-4o-mini"]

    def prices(**spec: Any) -> tuple[float, float]:
        llm = resolve(settings, ServiceLLMSpec(**spec))
        return llm.input_usd_per_million, llm.output_usd_per_million

    assert prices(model="house-model") == (1.0, 2.0)  # the table's entry beats the settings default
    assert prices(model="gpt-4o") == (3.0, 12.0)
    assert prices(model="gpt-4o-2024-08-06") == (3.0, 12.0)  # a dated snapshot is priced like its family
    assert prices(model="gpt-4o-2024-05-13") == DEFAULT_PRICES["gpt-4o-2024-05-13"]  # unless it has its own entry
    assert prices(model="gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert prices(model="unknown-model") == (7.0, 8.0)  # nothing in the table: the settings default
    assert prices(model="house-model", input_usd_per_million=9.0) == (9.0, 2.0)  # a nonzero spec price wins
    assert prices(model="unknown-model", output_usd_per_million=0.5) == (7.0, 0.5)


def test_built_in_prices_and_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_REQUESTS_PER_MINUTE", "500")
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_TOKENS_PER_MINUTE", "30000")
    merged = resolve(ServiceLLMSettings(), ServiceLLMSpec(model="gpt-4o-mini"))
    assert (merged.input_usd_per_million, merged.output_usd_per_million) == DEFAULT_PRICES["gpt-4o-mini"]
    assert (merged.requests_per_minute, merged.tokens_per_minute) == (500, 30000)
    assert resolve(ServiceLLMSettings(requests_per_minute=None)).requests_per_minute is None
    with pytest.raises(ValueError, match="negative"):
        ServiceLLMSettings(prices={"m": (-1.0, 1.0)})


def test_own_key_variable_wins_over_openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_API_KEY", "sk-ours")
    key = ServiceLLMSettings().api_key
    assert key is not None and key.get_secret_value() == "sk-ours"
