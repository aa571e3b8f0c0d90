"""`llamaduo serve`: the OpenAI-compatible chat API over a local model and PEFT adapters."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model

from llamaduo.localmodel import load_causal_lm, load_tokenizer
from llamaduo_inferencer.generation import Completion, encode_chats
from llamaduo_inferencer.serve import ChatEngine, ChatRequest, create_app
from llamaduo_inferencer.serve.constrained import normalize_schema, unenforced_keywords
from llamaduo_inferencer.serve.engine import (
    EngineClosedError,
    GenerationError,
    PreparedRequest,
    SchedulerStats,
    StreamDelta,
    StreamEnd,
    json_schema_of,
)
from llamaduo_inferencer.serve.schemas import ResponseFormat
from tests.support.live_server import serve_in_thread

pytestmark = pytest.mark.usefixtures("torch_single_thread")

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "similarity": {"type": "integer", "minimum": 1, "maximum": 100},
        "precision": {"type": "integer", "minimum": 1, "maximum": 100},
        "reason": {"type": "string", "maxLength": 120},
    },
    "required": ["similarity", "precision", "reason"],
    "additionalProperties": False,
}
PAIRS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "instruction": {"type": "string", "maxLength": 300},
                    "response": {"type": "string", "maxLength": 300},
                },
                "required": ["instruction", "response"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["pairs"],
    "additionalProperties": False,
}
# A JSON value that looks like a schema: inside const/enum it must stay as it is.
BOUNDED_VALUE = {"type": "integer", "minimum": 1, "maximum": 2}
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, Path] = {}
    for seed, name in enumerate(("style-a", "style-b")):
        torch.manual_seed(seed)
        base = load_causal_lm(tiny_model_dir, "cpu")
        # Random (not zero) LoRA weights, so that an adapter visibly changes the answers.
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(str(root / name))
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ChatEngine:
    return ChatEngine.load(
        str(tiny_model_dir),
        adapters=adapters,
        model_cache=tmp_path_factory.mktemp("model-cache"),
        served_name="tiny",
        device="cpu",
    )


@pytest.fixture(scope="module")
def client(engine: ChatEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as test_client:
        yield test_client


def _chat(client: TestClient, **fields: Any) -> httpx2.Response:
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES} | fields)


def _events(response: httpx2.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]


def test_a_reply_has_openai_shape_and_usage(client: TestClient, engine: ChatEngine) -> None:
    response = _chat(client, max_tokens=5, n=2, seed=1, temperature=0.9)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny"
    assert abs(body["created"] - time.time()) < 60
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] == "length"
    prompt_tokens = len(encode_chats(engine.tokenizer, [MESSAGES])[0])
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 10,
        "total_tokens": prompt_tokens + 10,
    }


def test_streaming_sends_chunks_then_done_with_the_same_text(client: TestClient) -> None:
    request = {"max_tokens": 6, "n": 2, "seed": 5, "temperature": 0.8}
    plain = _chat(client, **request).json()
    response = _chat(client, stream=True, stream_options={"include_usage": True}, **request)
    assert response.status_code == 200
    events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    texts = {0: "", 1: ""}
    finish: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert texts == {i: plain["choices"][i]["message"]["content"] for i in (0, 1)}
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == plain["usage"]


def test_models_lists_the_base_model_and_every_adapter(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["tiny", "style-a", "style-b"]
    assert {card["object"] for card in body["data"]} == {"model"}
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "adapters": ["style-a", "style-b"]}


def test_the_model_field_selects_the_adapter(client: TestClient) -> None:
    def answer(model: str) -> str:
        response = _chat(client, model=model, max_tokens=6, temperature=0)
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    base, style_a, style_b = answer("tiny"), answer("style-a"), answer("style-b")
    assert len({base, style_a, style_b}) == 3
    assert answer("tiny") == base, "the base model must come back after an adapter was used"


def test_an_unknown_model_is_a_404_with_an_openai_error(client: TestClient) -> None:
    response = _chat(client, model="gpt-4o")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert error["code"] == "model_not_found"
    assert "gpt-4o" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
            "response_format",
        ),
        (
            {
                "max_tokens": 5,
                "response_format": {"type": "json_schema", "json_schema": {"name": "judge", "schema": JUDGE_SCHEMA}},
            },
            "max_tokens",
        ),
    ],
)
def test_bad_requests_are_400_with_an_openai_error(client: TestClient, fields: dict[str, Any], param: str) -> None:
    response = _chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_malformed_json_is_a_400(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_stop_strings_end_the_answer(client: TestClient) -> None:
    plain = _chat(client, max_tokens=12, seed=2).json()["choices"][0]["message"]["content"]
    stop = plain[5:8]
    stopped = _chat(client, max_tokens=12, seed=2, stop=stop).json()["choices"][0]
    assert stopped["message"]["content"] == plain[: plain.find(stop)]
    assert stopped["finish_reason"] == "stop"


@pytest.mark.parametrize("max_tokens", [48, 120])
def test_json_schema_output_validates_even_from_a_random_model(client: TestClient, max_tokens: int) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "judge", "schema": JUDGE_SCHEMA, "strict": True}}
    response = _chat(client, max_tokens=max_tokens, n=3, seed=0, temperature=1.0, response_format=response_format)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        document = json.loads(choice["message"]["content"])
        jsonschema.validate(document, JUDGE_SCHEMA)
        assert 1 <= document["similarity"] <= 100


def test_json_schema_output_validates_when_streamed(client: TestClient) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "judge", "schema": JUDGE_SCHEMA}}
    response = _chat(client, max_tokens=60, seed=4, stream=True, response_format=response_format, stop=["}"])
    events = _events(response)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(event)["choices"][0]["delta"].get("content") or "" for event in events[:-1])
    jsonschema.validate(json.loads(text), JUDGE_SCHEMA)


def test_an_unbounded_string_is_still_closed_within_max_tokens(client: TestClient, engine: ChatEngine) -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    needed = engine.grammars.get(schema).min_tokens
    response_format = {"type": "json_schema", "json_schema": {"name": "free", "schema": schema}}
    for max_tokens in (needed, needed + 3, 40):
        response = _chat(client, max_tokens=max_tokens, n=2, seed=9, response_format=response_format)
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        assert response.json()["usage"]["completion_tokens"] <= 2 * max_tokens


def test_json_object_mode_shares_the_validation(engine: ChatEngine) -> None:
    assert json_schema_of(ResponseFormat(type="json_object")) == {"type": "object"}
    assert json_schema_of(ResponseFormat(type="text")) is None
    assert json_schema_of(None) is None


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "integer", "minimum": 1, "maximum": 3}, {"enum": [1, 2, 3]}),
        ({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}, {"enum": [1, 2]}),
        ({"type": "integer", "minimum": 0.5, "maximum": 2.5, "description": "d"}, {"description": "d", "enum": [1, 2]}),
        ({"type": "integer", "minimum": 5, "maximum": 1}, {"type": "integer", "minimum": 5, "maximum": 1}),
        ({"type": "integer", "minimum": 0}, {"type": "integer", "minimum": 0}),
        ({"type": "integer", "minimum": 0, "maximum": 10**6}, {"type": "integer", "minimum": 0, "maximum": 10**6}),
        (
            {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 2}},
            {"type": "array", "items": {"enum": [1, 2]}},
        ),
        (
            {"const": {"type": "integer", "minimum": 1, "maximum": 2}},
            {"const": {"type": "integer", "minimum": 1, "maximum": 2}},
        ),
    ],
)
def test_bounded_integers_become_enums(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    assert normalize_schema(schema) == expected


def test_unenforced_keywords_are_reported_after_normalisation() -> None:
    assert unenforced_keywords(normalize_schema(JUDGE_SCHEMA)) == set()
    schema = {"type": "object", "properties": {"x": {"type": "number", "maximum": 1}, "y": {"not": {"type": "null"}}}}
    assert unenforced_keywords(schema) == {"maximum", "not"}


async def test_concurrent_requests_are_queued_and_all_served(engine: ChatEngine) -> None:
    transport = httpx2.ASGITransport(app=create_app(engine))
    async with httpx2.AsyncClient(transport=transport, base_url="http://serve") as http:
        requests = [
            http.post("/v1/chat/completions", json={"model": name, "messages": MESSAGES, "max_tokens": 4, "seed": 1})
            for name in ("tiny", "style-a", "style-b", "tiny")
        ]
        health = http.get("/health")
        responses = await asyncio.gather(*requests, health)
    assert [response.status_code for response in responses] == [200] * 5
    answers = [response.json()["choices"][0]["message"]["content"] for response in responses[:4]]
    assert answers[0] == answers[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.mark.slow
async def test_smollm2_answers_under_concurrency_match_one_at_a_time(smollm2_dir: Path) -> None:
    # A real model, whose answers depend on every token of the prompt: padding, positions and cache merging must be
    # right for the batched rows to say exactly what `generate` says for each request alone.
    model, tokenizer = load_causal_lm(smollm2_dir, "cpu"), load_tokenizer(smollm2_dir)
    batched = ChatEngine(model, tokenizer, base_name="smollm2")
    reference = ChatEngine(model, tokenizer, base_name="smollm2", continuous_batching=False)

    def ask(content: str, max_tokens: int, **options: Any) -> ChatRequest:
        return ChatRequest([{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens, **options)

    requests = [
        (ask("What is the capital of France?", 24), False),
        (ask("Write a haiku about autumn leaves falling in a quiet park.", 40), True),
        (ask("Explain in two sentences why the sky is blue.", 32, stop=("light",)), False),
        (ask("hi", 16), False),
        (ask("Give the capital of Japan as JSON.", 40, json_schema=CITY_SCHEMA), False),
    ]
    try:
        expected = [
            await _run(reference, await reference.prepare("smollm2", request), streaming)
            for request, streaming in requests
        ]
        prepared = [await batched.prepare("smollm2", request) for request, _ in requests]
        results = await asyncio.gather(
            *(_run(batched, p, streaming) for p, (_, streaming) in zip(prepared, requests, strict=True))
        )
    finally:
        batched.close()
        reference.close()
    for (want, _), (got, streamed) in zip(expected, results, strict=True):
        assert [(c.text, c.finish_reason) for c in got] == [(c.text, c.finish_reason) for c in want]
        assert streamed is None or streamed == got[0].text
    assert "Paris" in results[0][0][0].text
    assert [completions[0].finish_reason for completions, _ in results] == ["stop", "length", "stop", "stop", "stop"]
    jsonschema.validate(json.loads(results[4][0][0].text), CITY_SCHEMA)
    stats = batched.stats()
    assert stats is not None and stats.peak_rows == len(requests)


@pytest.mark.slow
def test_the_openai_client_gets_valid_judge_json_from_smollm2(smollm2_dir: Path) -> None:
    port = _free_port()
    cache = smollm2_dir.parent
    code = (
        "from pathlib import Path; from llamaduo_inferencer.serve import run_server; "
        f"run_server('bundled:smollm2-135m-instruct', host='127.0.0.1', port={port}, adapters={{}}, "
        f"model_cache=Path({str(cache)!r}), served_name='smollm2')"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "LLAMADUO_DEVICE": "cpu"}
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server exited"
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not start in 120 s"
                time.sleep(0.5)
        assert [model.id for model in models.data] == ["smollm2"]
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model="smollm2",
            messages=[
                {"role": "system", "content": "You are a strict grader. Answer in JSON."},
                {
                    "role": "user",
                    "content": "Reference: 'Paris is the capital of France.' Candidate: 'The capital of France is "
                    "Paris.' Rate similarity and precision from 1 to 100 and give a short reason.",
                },
            ],
            response_format={"type": "json_schema", "json_schema": {"name": "judge", "schema": JUDGE_SCHEMA}},
            max_tokens=200,
            temperature=0,
        )
        elapsed = time.perf_counter() - started
        document = json.loads(reply.choices[0].message.content or "")
        jsonschema.validate(document, JUDGE_SCHEMA)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        print(f"judge reply in {elapsed:.1f} s: {document}")

        pairs = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Write two instruction/response pairs about making tea, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "pairs", "schema": PAIRS_SCHEMA}},
            max_tokens=300,
            temperature=0.7,
            seed=1,
        )
        jsonschema.validate(json.loads(pairs.choices[0].message.content or ""), PAIRS_SCHEMA)

        chunks = list(
            client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
                response_format={"type": "json_object"},
                max_tokens=80,
                stream=True,
            )
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert isinstance(json.loads(text), dict)
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------------
# Continuous batching: concurrent requests share the batch and get the answers they would get alone.
# ---------------------------------------------------------------------------------------------------------------

LONGER_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three rivers of Europe and say which one is the longest, in one line."},
]


@pytest.fixture(scope="module")
def one_at_a_time(engine: ChatEngine) -> Iterator[ChatEngine]:
    """The same model and adapters served the old way, one `generate` call per request: the reference answers."""
    reference = ChatEngine(
        engine.model,
        engine.tokenizer,
        base_name=engine.base_name,
        adapter_names=engine.adapter_names,
        continuous_batching=False,
    )
    yield reference
    reference.close()


@pytest.fixture
def make_engine(tiny_model_dir: Path) -> Iterator[Callable[..., ChatEngine]]:
    """Build engines over a fresh tiny model without adapters (each closed after the test)."""
    made: list[ChatEngine] = []

    def make(**options: Any) -> ChatEngine:
        built = ChatEngine(
            load_causal_lm(tiny_model_dir, "cpu"), load_tokenizer(tiny_model_dir), base_name="tiny", **options
        )
        made.append(built)
        return built

    yield make
    for built in made:
        built.close()


def _wait_until_idle(engine: ChatEngine, timeout_s: float = 10.0) -> SchedulerStats:
    """Wait until the scheduler has no row running or waiting (a row leaves the batch just after its result)."""
    deadline = time.monotonic() + timeout_s
    while (stats := engine.stats()) is not None and (stats.running_rows or stats.waiting_rows):
        assert time.monotonic() < deadline, f"rows are still in the batch: {stats}"
        time.sleep(0.01)
    assert stats is not None
    return stats


async def _run(engine: ChatEngine, prepared: PreparedRequest, streaming: bool) -> tuple[list[Completion], str | None]:
    """Complete a prepared request, or stream it and return the completions with the streamed text of choice 0."""
    if not streaming:
        return await engine.complete(prepared), None
    text = ""
    async for item in engine.stream(prepared):
        if isinstance(item, StreamDelta) and item.index == 0:
            text += item.text
        elif isinstance(item, StreamEnd):
            return item.completions, text
    raise AssertionError("the stream ended without a StreamEnd")


async def test_concurrent_requests_share_a_batch_and_get_the_answers_they_get_alone(
    engine: ChatEngine, one_at_a_time: ChatEngine
) -> None:
    assert engine.batching and not one_at_a_time.batching
    requests: list[tuple[str, ChatRequest, bool]] = [
        ("tiny", ChatRequest(MESSAGES, temperature=0, max_tokens=24), False),
        ("style-a", ChatRequest(LONGER_MESSAGES, temperature=0, max_tokens=40), False),
        ("style-b", ChatRequest(MESSAGES, temperature=0, max_tokens=9, n=2), False),
        ("style-a", ChatRequest(MESSAGES, temperature=0, max_tokens=30), True),
        ("tiny", ChatRequest(LONGER_MESSAGES, temperature=0, max_tokens=60, json_schema=JUDGE_SCHEMA), False),
        ("style-b", ChatRequest(LONGER_MESSAGES, temperature=0, max_tokens=33, stop=("millan",)), False),
    ]
    # The reference: one request at a time through `generate`.
    expected = [
        await _run(one_at_a_time, await one_at_a_time.prepare(name, request), streaming)
        for name, request, streaming in requests
    ]
    # The rows of all six requests are queued before the scheduler's next step, so they run as one batch.
    prepared = [await engine.prepare(name, request) for name, request, _ in requests]
    before = engine.stats()
    results = await asyncio.gather(
        *(_run(engine, p, streaming) for p, (_, _, streaming) in zip(prepared, requests, strict=True))
    )
    after = engine.stats()

    for (name, request, streaming), (want, _), (got, streamed) in zip(requests, expected, results, strict=True):
        assert [(c.text, c.finish_reason, c.completion_tokens) for c in got] == [
            (c.text, c.finish_reason, c.completion_tokens) for c in want
        ], name
        assert len(got) == request.n
        if streaming:
            assert streamed == got[0].text
    assert [c.finish_reason for c in results[0][0]] == ["length"]
    assert results[5][0][0].finish_reason == "stop", "the stop string ends its row while the others go on"
    jsonschema.validate(json.loads(results[4][0][0].text), JUDGE_SCHEMA)
    assert len({results[0][0][0].text, results[1][0][0].text, results[2][0][0].text}) == 3, "one adapter per row"
    # Sent one at a time these would take one forward pass per generated token; batched, the longest row's count
    # plus a prefill per group of rows that joined together (one or two here; at most one per request).
    assert before is not None and after is not None
    generated = sum(completions[0].completion_tokens for completions, _ in results)
    passes = after.forward_passes - before.forward_passes
    longest = max(completions[0].completion_tokens for completions, _ in results)
    assert passes <= longest + len(requests) < generated / 2, (passes, longest, generated)
    assert after.peak_rows >= 6


async def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch(engine: ChatEngine) -> None:
    request = ChatRequest(MESSAGES, n=2, temperature=0.9, max_tokens=12, seed=11)
    alone = [c.text for c in await engine.chat("style-a", request)]
    others = [ChatRequest(LONGER_MESSAGES, n=3, temperature=1.0, max_tokens=20, seed=s) for s in range(3)]
    together = await asyncio.gather(
        engine.chat("tiny", others[0]),
        engine.chat("style-a", request),
        engine.chat("style-b", others[1]),
        engine.chat("style-a", others[2]),
    )
    assert [c.text for c in together[1]] == alone
    assert alone[0] != alone[1], "each choice samples from its own generator"


def test_a_client_that_disconnects_mid_stream_frees_its_rows(make_engine: Callable[..., ChatEngine]) -> None:
    engine = make_engine()
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0}
    with serve_in_thread(create_app(engine)) as base_url, ThreadPoolExecutor(max_workers=1) as pool:
        url = f"{base_url}/v1/chat/completions"
        before = engine.stats()
        other = pool.submit(httpx2.post, url, json=body | {"max_tokens": 300}, timeout=120)
        received = 0
        with httpx2.stream("POST", url, json=body | {"max_tokens": 1800, "stream": True}, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    received += 1
                if received == 3:
                    break  # the client goes away mid-stream
        reply = other.result()
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 300, "the other request in the batch is unaffected"
        stats = _wait_until_idle(engine)
    assert before is not None
    # Had it run to the end, the abandoned stream alone would have taken 1800 forward passes.
    assert stats.forward_passes - before.forward_passes < 900


async def test_a_failing_step_fails_its_batch_and_the_scheduler_goes_on(
    make_engine: Callable[..., ChatEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One row per step: `long` runs while `short` waits for its slot.
    engine = make_engine(max_batch_size=1)
    long_request = await engine.prepare("tiny", ChatRequest(MESSAGES, temperature=0, max_tokens=400))
    short_request = await engine.prepare("tiny", ChatRequest(LONGER_MESSAGES, temperature=0.8, seed=3, max_tokens=12))
    short_alone = await engine.complete(short_request)

    forward = engine.model.forward
    # Each check is consulted before a forward pass; the first that holds makes that pass fail, once.
    fail_when: list[Callable[[], bool]] = [lambda: getattr(engine.stats(), "waiting_rows", 0) > 0]
    failures: list[str] = []

    def flaky_forward(*args: Any, **kwargs: Any) -> Any:
        if fail_when and fail_when[0]():
            fail_when.pop(0)
            failures.append("out of memory")
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", flaky_forward)
    long_result, short_result = await asyncio.wait_for(
        asyncio.gather(engine.complete(long_request), engine.complete(short_request), return_exceptions=True), 60
    )
    assert failures == ["out of memory"]
    assert isinstance(long_result, GenerationError), long_result
    assert "OutOfMemoryError" in str(long_result)
    assert not isinstance(short_result, BaseException), "a row waiting for a slot is not part of the failed batch"
    assert [c.text for c in short_result] == [c.text for c in short_alone]

    # The scheduler still serves; over HTTP a failed step is an OpenAI-style 500.
    transport = httpx2.ASGITransport(app=create_app(engine))
    async with httpx2.AsyncClient(transport=transport, base_url="http://serve") as http:
        fail_when.append(lambda: True)
        failed = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
        served = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 5})
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] == 5
    stats = _wait_until_idle(engine)
    assert stats.failed_steps == 2


async def test_close_fails_unfinished_requests_and_refuses_new_ones(make_engine: Callable[..., ChatEngine]) -> None:
    engine = make_engine(max_batch_size=1)
    schedulers = sum(thread.name == "llamaduo-scheduler" for thread in threading.enumerate())
    prepared = [await engine.prepare("tiny", ChatRequest(MESSAGES, temperature=0, max_tokens=1500)) for _ in range(2)]
    running = [asyncio.ensure_future(engine.complete(p)) for p in prepared]
    deadline = time.monotonic() + 10
    while (stats := engine.stats()) is None or not (stats.running_rows and stats.waiting_rows):
        assert time.monotonic() < deadline, "the requests did not start"
        await asyncio.sleep(0.01)
    engine.close()
    for outcome in await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 30):
        assert isinstance(outcome, EngineClosedError), outcome
        assert "shutting down" in str(outcome)
    assert sum(thread.name == "llamaduo-scheduler" for thread in threading.enumerate()) == schedulers - 1
    with pytest.raises(EngineClosedError):
        await engine.prepare("tiny", ChatRequest(MESSAGES))
    transport = httpx2.ASGITransport(app=create_app(engine))
    async with httpx2.AsyncClient(transport=transport, base_url="http://serve") as http:
        response = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    engine.close()  # idempotent


async def test_a_model_that_cannot_be_batched_is_served_one_request_at_a_time(
    make_engine: Callable[..., ChatEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llamaduo_inferencer.serve.engine.supports_continuous_batching", lambda model: False)
    engine = make_engine()
    assert not engine.batching and engine.stats() is None
    request = ChatRequest(MESSAGES, n=2, temperature=0.8, seed=4, max_tokens=7)
    plain = await engine.chat("tiny", request)
    streamed, text = await _run(engine, await engine.prepare("tiny", request), streaming=True)
    assert [c.text for c in streamed] == [c.text for c in plain]
    assert text == plain[0].text
    assert [c.completion_tokens for c in plain] == [7, 7]
