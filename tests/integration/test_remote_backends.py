"""The remote inference backends against scripted servers over real HTTP: TGI's native API through
huggingface_hub, and an OpenAI-compatible (vLLM-like) server through openai. Answers, adapters, seeds, token
accounting, bounded concurrency, retries, timeouts and the errors a person can act on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypedDict, TypeVar

import huggingface_hub.constants
import pytest
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import OfflineModeIsEnabled

from llamaduo_inferencer.backends import BackendError, Sampling
from llamaduo_inferencer.backends.openai_compat import OpenAICompatibleBackend
from llamaduo_inferencer.backends.tgi import TGIBackend
from llamaduo_inferencer.generation import Message
from tests.support.scripted_tgi import ScriptedTGI, count_tokens, scripted_answer

pytestmark = pytest.mark.integration

ADAPTER = "acme/support-adapter"
BASE = "scripted/base-model"
CONVERSATION: list[Message] = [
    {"role": "system", "content": "You answer support tickets."},
    {"role": "user", "content": "My invoice shows the wrong currency, what do I do?"},
]


class Backoff(TypedDict):
    backoff_base_s: float
    backoff_max_s: float


FAST = Backoff(backoff_base_s=0.01, backoff_max_s=0.05)
"""Short backoffs, so that retry tests take milliseconds."""
B = TypeVar("B", TGIBackend, OpenAICompatibleBackend)


def render(conversation: Sequence[Message]) -> tuple[str, int]:
    """A stand-in chat template; the scripted server counts whitespace-separated words as tokens."""
    text = "\n".join(f"<|{m['role']}|> {m['content']}" for m in conversation) + "\n<|assistant|>"
    return text, count_tokens(text)


def chat_prompt(conversation: Sequence[Message]) -> str:
    """The text the scripted server's OpenAI route answers (its own 'template')."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in conversation)


def sampled(n: int = 1, **overrides: Any) -> Sampling:
    values: dict[str, Any] = {"n": n, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 32}
    values.update(overrides)
    return Sampling(**values)


@pytest.fixture
def tgi() -> Iterator[ScriptedTGI]:
    with ScriptedTGI(adapters={ADAPTER}, model_id=BASE) as server:
        yield server


@contextlib.asynccontextmanager
async def opened(backend: B) -> AsyncIterator[B]:
    try:
        yield backend
    finally:
        await backend.aclose()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- TGI


async def test_tgi_answers_n_completions_from_the_adapter_with_consecutive_seeds(tgi: ScriptedTGI) -> None:
    prompt, prompt_tokens = render(CONVERSATION)
    async with opened(TGIBackend(tgi.base_url, render, concurrency=4, timeout_s=5, max_retries=0)) as backend:
        completions = await backend.answer(CONVERSATION, sampled(3, seed=11), ADAPTER)

    assert [c.text for c in completions] == [scripted_answer(prompt, ADAPTER, 11 + j, 8) for j in range(3)]
    assert all(c.completion_tokens == 8 and c.finish_reason == "stop" for c in completions)
    assert all(c.prompt_tokens == prompt_tokens and c.latency_s > 0 for c in completions)
    parameters = [body["parameters"] for body in tgi.bodies]
    assert len(parameters) == 3
    assert sorted(p["seed"] for p in parameters) == [11, 12, 13]
    assert all(p["adapter_id"] == ADAPTER and p["do_sample"] is True and p["details"] is True for p in parameters)
    assert all(p["temperature"] == 0.7 and p["max_new_tokens"] == 32 for p in parameters)
    # TGI refuses top_p >= 1: "no nucleus sampling" must be left out, not sent as 1.0.
    assert all("top_p" not in p for p in parameters)
    assert {body["inputs"] for body in tgi.bodies} == {prompt}


async def test_tgi_base_model_sends_no_adapter_and_passes_top_p(tgi: ScriptedTGI) -> None:
    prompt, _ = render(CONVERSATION)
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=0)) as backend:
        (completion,) = await backend.answer(CONVERSATION, sampled(1, top_p=0.9, seed=3), None)

    assert completion.text == scripted_answer(prompt, None, 3, 8)
    (body,) = tgi.bodies
    assert "adapter_id" not in body["parameters"]
    assert body["parameters"]["top_p"] == 0.9


async def test_tgi_greedy_sends_one_request_without_sampling_parameters(tgi: ScriptedTGI) -> None:
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=0)) as backend:
        completions = await backend.answer(CONVERSATION, sampled(3, temperature=0.0, seed=5), ADAPTER)

    assert len(completions) == 3 and len({c.text for c in completions}) == 1
    assert completions[0].text.startswith(f"adapter={ADAPTER} seed=none")
    (body,) = tgi.bodies
    assert body["parameters"]["do_sample"] is False
    assert not {"temperature", "top_p", "seed"} & set(body["parameters"])


async def test_tgi_finish_reasons_length_and_stop_string(tgi: ScriptedTGI) -> None:
    prompt, _ = render(CONVERSATION)
    full = scripted_answer(prompt, ADAPTER, 1, 8)
    stop = " " + full.split(" ")[5]
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=0)) as backend:
        (cut,) = await backend.answer(CONVERSATION, sampled(1, max_new_tokens=4, seed=1), ADAPTER)
        (stopped,) = await backend.answer(CONVERSATION, sampled(1, seed=1, stop=(stop, "never-there")), ADAPTER)

    assert cut.finish_reason == "length" and cut.completion_tokens == 4
    assert cut.text == " ".join(full.split(" ")[:4])
    # TGI keeps the stop string at the end of generated_text; the backend removes it, like the local engine.
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]
    assert stopped.completion_tokens == 6
    assert tgi.bodies[-1]["parameters"]["stop"] == [stop, "never-there"]


async def test_tgi_concurrency_never_exceeds_the_bound(tgi: ScriptedTGI) -> None:
    tgi.latency_s = 0.15
    conversations = [[{"role": "user", "content": f"question number {i}"}] for i in range(4)]
    async with opened(TGIBackend(tgi.base_url, render, concurrency=3, timeout_s=5, max_retries=0)) as backend:
        results = await asyncio.gather(
            *(backend.answer(c, sampled(3, seed=i), None) for i, c in enumerate(conversations))
        )

    assert [len(r) for r in results] == [3, 3, 3, 3]
    assert len(tgi.requests) == 12
    assert tgi.max_in_flight == 3  # bounded, yet actually concurrent


async def test_tgi_retries_transient_errors_and_succeeds(tgi: ScriptedTGI) -> None:
    tgi.script(503, "429:0.05", 500, "garbage")
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=4, **FAST)) as backend:
        (completion,) = await backend.answer(CONVERSATION, sampled(1, seed=2), ADAPTER)

    assert completion.text.startswith(f"adapter={ADAPTER} seed=2")
    assert len(tgi.requests) == 5 and tgi.faults_served == 4


async def test_tgi_honours_retry_after(tgi: ScriptedTGI) -> None:
    tgi.script("429:0.6")
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=1, **FAST)) as backend:
        started = time.monotonic()
        await backend.answer(CONVERSATION, sampled(1), None)
        elapsed = time.monotonic() - started

    assert len(tgi.requests) == 2
    assert elapsed >= 0.6  # the jittered backoff alone would be <= 0.05 s


async def test_tgi_gives_up_after_its_retries_naming_the_last_error(tgi: ScriptedTGI) -> None:
    tgi.script(503, 503, 503)
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=2, **FAST)) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(1), None)

    assert caught.value.reason == "tgi:unreachable"
    assert tgi.base_url in str(caught.value) and "HTTP 503" in str(caught.value) and "3 attempt" in str(caught.value)
    assert len(tgi.requests) == 3


async def test_tgi_unreachable_endpoint_fails_fast() -> None:
    url = closed_port_url()
    async with opened(TGIBackend(url, render, timeout_s=5, max_retries=2, backoff_base_s=0.1)) as backend:
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(2, seed=0), ADAPTER)
        elapsed = time.monotonic() - started

    assert caught.value.reason == "tgi:unreachable"
    assert url in str(caught.value) and "connect" in str(caught.value).lower()
    assert elapsed < 5


async def test_tgi_timeout_is_retried_then_fails_clearly(tgi: ScriptedTGI) -> None:
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=0.5, max_retries=1, **FAST)) as backend:
        tgi.script("delay:2")
        (completion,) = await backend.answer(CONVERSATION, sampled(1), None)
        assert completion.text.startswith("adapter=base")
        assert len(tgi.requests) == 2

        tgi.clear()
        tgi.script("delay:2", "delay:2")
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(1), None)
        elapsed = time.monotonic() - started

    assert caught.value.reason == "tgi:unreachable"
    assert "timed out after 0.5 s" in str(caught.value)
    assert 1.0 <= elapsed < 2.0  # two attempts of 0.5 s each, never the server's 2 s


@pytest.mark.parametrize("status", [422, 400])
async def test_tgi_unknown_adapter_fails_at_once_with_a_hint(status: int) -> None:
    with ScriptedTGI(adapters={ADAPTER}, unknown_adapter_status=status) as server:
        async with opened(TGIBackend(server.base_url, render, timeout_s=5, max_retries=3, **FAST)) as backend:
            with pytest.raises(BackendError) as caught:
                await backend.answer(CONVERSATION, sampled(2, seed=0), "acme/never-loaded")
        requests = len(server.requests)

    assert caught.value.reason == "tgi:unknown_adapter"
    message = str(caught.value)
    assert server.base_url in message and f"HTTP {status}" in message
    assert "acme/never-loaded` is not loaded" in message  # the server's own text
    assert "LORA_ADAPTERS=acme/never-loaded" in message
    assert requests <= 2  # no retries: at most the two samples' first attempts (the second may be cancelled)


@pytest.mark.parametrize(
    ("max_total_tokens", "max_input_tokens", "server_text"),
    [
        (40, None, "`inputs` tokens + `max_new_tokens` must be <= 40"),
        (4096, 10, "`inputs` must have less than 10 tokens"),
    ],
)
async def test_tgi_prompt_too_long(max_total_tokens: int, max_input_tokens: int | None, server_text: str) -> None:
    with ScriptedTGI(max_total_tokens=max_total_tokens, max_input_tokens=max_input_tokens) as server:
        async with opened(TGIBackend(server.base_url, render, timeout_s=5, max_retries=3, **FAST)) as backend:
            with pytest.raises(BackendError) as caught:
                await backend.answer(CONVERSATION, sampled(1), None)
        requests = len(server.requests)

    assert caught.value.reason == "tgi:prompt_too_long"
    assert server_text in str(caught.value) and "HTTP 422" in str(caught.value)
    assert requests == 1


async def test_tgi_other_client_errors_are_rejected_without_retry(tgi: ScriptedTGI) -> None:
    tgi.script(401)
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=3, **FAST)) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(1), None)

    assert caught.value.reason == "tgi:rejected"
    assert "HTTP 401" in str(caught.value) and "scripted HTTP 401" in str(caught.value)
    assert len(tgi.requests) == 1


async def test_tgi_works_in_hub_offline_mode_and_never_leaks_the_hub_token(
    tgi: ScriptedTGI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our services run with HF_HUB_OFFLINE=1, which huggingface_hub reads once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_ambient_secret")
    plain = AsyncInferenceClient(base_url=tgi.base_url, timeout=5)
    try:
        with pytest.raises(OfflineModeIsEnabled):  # why the backend brings its own HTTP client
            await plain.text_generation("hello", max_new_tokens=2)
    finally:
        await plain.close()  # type: ignore[no-untyped-call]

    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=0)) as backend:
        (completion,) = await backend.answer(CONVERSATION, sampled(1), ADAPTER)
    async with opened(TGIBackend(tgi.base_url, render, timeout_s=5, max_retries=0, api_key="tgi-key")) as backend:
        await backend.answer(CONVERSATION, sampled(1), ADAPTER)

    assert completion.completion_tokens == 8
    assert [r["authorization"] for r in tgi.requests] == [None, "Bearer tgi-key"]


# ---------------------------------------------------------------- OpenAI-compatible


async def test_openai_selects_the_adapter_by_model_name_and_maps_usage(tgi: ScriptedTGI) -> None:
    prompt = chat_prompt(CONVERSATION)
    # The server's root URL is accepted as well as its /v1 URL.
    backend = OpenAICompatibleBackend(tgi.base_url, BASE, concurrency=4, timeout_s=5, max_retries=0)
    async with opened(backend):
        completions = await backend.answer(CONVERSATION, sampled(3, seed=5, top_p=0.95), ADAPTER)
        (base,) = await backend.answer(CONVERSATION, sampled(1, seed=5), None)

    assert [c.text for c in completions] == [scripted_answer(prompt, ADAPTER, 5 + j, 8) for j in range(3)]
    assert all(c.completion_tokens == 8 and c.prompt_tokens == count_tokens(prompt) for c in completions)
    assert all(c.finish_reason == "stop" and c.latency_s > 0 for c in completions)
    assert base.text == scripted_answer(prompt, None, 5, 8)
    bodies = tgi.bodies
    assert [b["model"] for b in bodies] == [ADAPTER] * 3 + [BASE]
    assert sorted(b["seed"] for b in bodies[:3]) == [5, 6, 7]
    assert all(b["n"] == 1 and b["max_tokens"] == 32 and b["temperature"] == 0.7 for b in bodies)
    assert all(b["top_p"] == 0.95 for b in bodies[:3])
    assert {r["route"] for r in tgi.requests} == {"/v1/chat/completions"}
    assert {r["authorization"] for r in tgi.requests} == {"Bearer EMPTY"}


async def test_openai_length_stop_and_missing_usage(caplog: pytest.LogCaptureFixture) -> None:
    prompt = chat_prompt(CONVERSATION)
    full = scripted_answer(prompt, None, 9, 8)
    stop = " " + full.split(" ")[4]
    with ScriptedTGI(model_id=BASE, include_usage=False) as server:
        backend = OpenAICompatibleBackend(server.openai_url, BASE, timeout_s=5, max_retries=0)
        async with opened(backend):
            with caplog.at_level(logging.WARNING, logger="llamaduo_inferencer.backends.openai_compat"):
                cut = await backend.answer(CONVERSATION, sampled(2, max_new_tokens=3, seed=9), None)
                (stopped,) = await backend.answer(CONVERSATION, sampled(1, seed=9, stop=(stop,)), None)

    assert [c.finish_reason for c in cut] == ["length", "length"]
    assert cut[0].text == " ".join(full.split(" ")[:3])
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.index(stop)]
    assert all(c.completion_tokens == 0 and c.prompt_tokens == 0 for c in [*cut, stopped])
    assert sum("no token usage" in r.getMessage() for r in caplog.records) == 1


async def test_openai_greedy_sends_one_request(tgi: ScriptedTGI) -> None:
    async with opened(OpenAICompatibleBackend(tgi.openai_url, BASE, timeout_s=5, max_retries=0)) as backend:
        completions = await backend.answer(CONVERSATION, sampled(4, temperature=0.0), ADAPTER)

    assert len(completions) == 4 and len({c.text for c in completions}) == 1
    (body,) = tgi.bodies
    assert body["temperature"] == 0.0


async def test_openai_unknown_model_fails_at_once_with_a_hint(tgi: ScriptedTGI) -> None:
    async with opened(OpenAICompatibleBackend(tgi.openai_url, BASE, timeout_s=5, max_retries=3, **FAST)) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(1), "acme/never-served")

    assert caught.value.reason == "openai:unknown_model"
    message = str(caught.value)
    assert "HTTP 404" in message and "The model `acme/never-served` does not exist." in message
    assert "--lora-modules acme/never-served=" in message
    assert len(tgi.requests) == 1


async def test_openai_prompt_too_long() -> None:
    with ScriptedTGI(model_id=BASE, max_total_tokens=30) as server:
        async with opened(OpenAICompatibleBackend(server.openai_url, BASE, timeout_s=5, max_retries=3)) as backend:
            with pytest.raises(BackendError) as caught:
                await backend.answer(CONVERSATION, sampled(1), None)
        requests = len(server.requests)

    assert caught.value.reason == "openai:prompt_too_long"
    assert "maximum context length is 30 tokens" in str(caught.value)
    assert requests == 1


async def test_openai_other_client_errors_are_rejected(tgi: ScriptedTGI) -> None:
    tgi.script(403)
    async with opened(OpenAICompatibleBackend(tgi.openai_url, BASE, timeout_s=5, max_retries=3, **FAST)) as backend:
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(1), None)

    assert caught.value.reason == "openai:rejected" and "HTTP 403" in str(caught.value)
    assert len(tgi.requests) == 1


async def test_openai_retries_transient_errors_then_succeeds_or_gives_up(tgi: ScriptedTGI) -> None:
    tgi.script(503, "429:0.05", 500)
    async with opened(OpenAICompatibleBackend(tgi.openai_url, BASE, timeout_s=5, max_retries=3, **FAST)) as backend:
        (completion,) = await backend.answer(CONVERSATION, sampled(1, seed=1), ADAPTER)
        assert completion.text.startswith(f"adapter={ADAPTER} seed=1")
        assert len(tgi.requests) == 4

        tgi.clear()
        tgi.script(502, 502, 502, 502)
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(1), ADAPTER)

    assert caught.value.reason == "openai:unreachable"
    assert "HTTP 502" in str(caught.value) and "4 attempt" in str(caught.value)
    assert len(tgi.requests) == 4


async def test_openai_unreachable_and_timeout_fail_fast(tgi: ScriptedTGI) -> None:
    url = closed_port_url()
    async with opened(OpenAICompatibleBackend(url, BASE, timeout_s=5, max_retries=2, backoff_base_s=0.1)) as backend:
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            await backend.answer(CONVERSATION, sampled(1), None)
        assert time.monotonic() - started < 5
    assert caught.value.reason == "openai:unreachable" and f"{url}/v1" in str(caught.value)

    tgi.script("delay:2", "delay:2")
    async with opened(OpenAICompatibleBackend(tgi.openai_url, BASE, timeout_s=0.4, max_retries=1, **FAST)) as backend:
        started = time.monotonic()
        with pytest.raises(BackendError) as timed_out:
            await backend.answer(CONVERSATION, sampled(1), None)
        elapsed = time.monotonic() - started
    assert timed_out.value.reason == "openai:unreachable" and "timed out after 0.4 s" in str(timed_out.value)
    assert elapsed < 1.8


async def test_openai_load_adapter_loaded_already_loaded_and_failing() -> None:
    with ScriptedTGI(model_id=BASE, loadable_paths={"/adapters/iteration-2"}) as server:
        backend = OpenAICompatibleBackend(server.base_url, BASE, timeout_s=5, max_retries=2, **FAST)
        async with opened(backend):
            server.script(503)  # transient: retried
            await backend.load_adapter("iteration-2", "/adapters/iteration-2")
            await backend.load_adapter("iteration-2", "/adapters/iteration-2")  # already loaded: fine
            (completion,) = await backend.answer(CONVERSATION, sampled(1, seed=4), "iteration-2")
            with pytest.raises(BackendError) as caught:
                await backend.load_adapter("iteration-3", "/adapters/missing")
        routes = [r["route"] for r in server.requests]
        load_bodies = [r["body"] for r in server.requests if r["route"].endswith("load_lora_adapter")]

    assert completion.text.startswith("adapter=iteration-2 seed=4")
    assert caught.value.reason == "openai:adapter_load_failed"
    assert "No adapter found for /adapters/missing" in str(caught.value) and "HTTP 400" in str(caught.value)
    assert routes.count("/v1/load_lora_adapter") == 4  # 503 + load + already loaded + failure (not retried)
    assert load_bodies[0] == {"lora_name": "iteration-2", "lora_path": "/adapters/iteration-2"}


async def test_openai_load_adapter_without_runtime_loading_explains_the_setting() -> None:
    with ScriptedTGI(model_id=BASE, runtime_lora=False) as server:
        async with opened(OpenAICompatibleBackend(server.openai_url, BASE, timeout_s=5, max_retries=2)) as backend:
            with pytest.raises(BackendError) as caught:
                await backend.load_adapter("x", "/adapters/x")

    assert caught.value.reason == "openai:adapter_load_failed"
    assert "HTTP 404" in str(caught.value) and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in str(caught.value)


async def test_openai_sends_the_api_key(tgi: ScriptedTGI) -> None:
    async with opened(OpenAICompatibleBackend(tgi.openai_url, BASE, api_key="sk-test", timeout_s=5)) as backend:
        await backend.answer(CONVERSATION, sampled(1), None)

    assert [r["authorization"] for r in tgi.requests] == ["Bearer sk-test"]
