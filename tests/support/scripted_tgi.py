"""A scripted inference server for tests: TGI's native API and an OpenAI-compatible (vLLM-like) chat API on one port.

In a test::

    with ScriptedTGI(adapters={"acme/adapter"}, max_total_tokens=64) as tgi:
        tgi.script(503, "429:0.1", "delay:3")
        ...  # point a TGIBackend at tgi.base_url, an OpenAICompatibleBackend at tgi.openai_url

Routes, shaped like the real servers' so the real clients (`huggingface_hub.AsyncInferenceClient`, `openai`) parse
them:

- `POST /` and `POST /generate` (TGI): body `{"inputs": str, "parameters": {...}}`. `AsyncInferenceClient` given a
  base URL posts to the URL itself, which real TGI serves as its compat route, so both paths answer. Validation
  follows TGI's router: `temperature` must be > 0, `top_p` in (0, 1), `max_new_tokens` > 0, at most 4 `stop`
  sequences, and the input must fit `max_input_tokens` and `inputs` tokens + `max_new_tokens` <= `max_total_tokens`
  (422 with TGI's message and `error_type: validation`). An `adapter_id` outside `adapters` gets
  `unknown_adapter_status` (422 by default) naming it. Note: real TGI (flash models) maps an adapter id it did not
  load to the base model and answers without an error; this server refuses instead so clients can be tested
  against servers that do refuse, and `silent_unknown_adapter=True` mimics TGI's fallback.
- `GET /info`, `GET /health` (TGI).
- `POST /v1/chat/completions` (vLLM / TGI Messages API): `model` selects the adapter (the base model's name, or
  "tgi", for no adapter); an unknown model gets vLLM's 404 `{"object": "error", "message": "The model `x` does not
  exist.", ...}`. `max_tokens` over the budget gets vLLM's 400 "This model's maximum context length is ...".
- `GET /v1/models`; `POST /v1/load_lora_adapter` (vLLM runtime LoRA loading): `{"lora_name", "lora_path"}` loads a
  path listed in `loadable_paths`; a name already loaded gets vLLM's 400 "... has already been loaded."; any
  other path gets 400 "Loading lora ... failed"; with `runtime_lora=False` the route does not exist (404), as in
  vLLM without `VLLM_ALLOW_RUNTIME_LORA_UPDATING`.

Answers are deterministic: `scripted_answer(prompt, adapter, seed, n_tokens)` — a line that starts with
`adapter=<id|base> seed=<seed|none>` followed by words drawn from a hash of all three, one token per word (tokens
here are whitespace-separated words; `count_tokens` counts them, for prompts too). An answer is `answer_tokens`
long; a smaller `max_new_tokens` (`max_tokens`) cuts it, with finish reason "length". A `stop` string found in the
answer ends it there: TGI keeps the stop string in `generated_text` (finish "stop_sequence"), the OpenAI route drops
it (finish "stop"), as vLLM does.

Faults (the `Fault` shorthands of `tests.support.scripted_llm`: 429, "429:0.2" for Retry-After, 500, 503,
"delay:3", "garbage") are consumed in order by generation and adapter-loading requests, before any random fault
drawn with `fault_rate`. TGI-style error bodies: 429 `{"error": "Model is overloaded", "error_type":
"overloaded"}`, 500 `error_type: incomplete_generation`, 502/503/504 a proxy's plain-text page; on the OpenAI routes
`{"error": {"message", "type", ...}}`.

Statistics: `requests` (every request, with its route, body and Authorization header), `served`,
`faults_served`, `max_in_flight` (the most generation requests handled at once: with `latency_s` > 0 this measures
a client's concurrency).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from tests.support.live_server import ServedInThread
from tests.support.scripted_llm import Fault

MAX_STOP_SEQUENCES = 4
"""TGI's default `--max-stop-sequences`."""
_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
)


def count_tokens(text: str) -> int:
    """The scripted server's token count: whitespace-separated words."""
    return len(text.split())


def scripted_answer(prompt: str, adapter: str | None, seed: int | None, n_tokens: int) -> str:
    """The full (untruncated) answer to `prompt` from `adapter` (None: base) with `seed`: `n_tokens` words."""
    head = [f"adapter={adapter or 'base'}", f"seed={'none' if seed is None else seed}"]
    digest = hashlib.sha256(f"{adapter}|{seed}|{prompt}".encode()).digest()
    body = [_WORDS[digest[i % len(digest)] % len(_WORDS)] for i in range(max(0, n_tokens - len(head)))]
    return " ".join((head + body)[:n_tokens])


@dataclass(frozen=True)
class Generated:
    """One scripted generation: the text returned and its accounting."""

    text: str
    tokens: int
    finish_reason: str  # TGI's: "length", "eos_token" or "stop_sequence"


def generate(answer: str, max_new_tokens: int, stop: Iterable[str], *, keep_stop: bool) -> Generated:
    """Cut `answer` at `max_new_tokens` words or at the first stop string, like a server's stopping criteria."""
    words = answer.split(" ")
    text = " ".join(words[:max_new_tokens])
    finish = "length" if len(words) > max_new_tokens else "eos_token"
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if hits:
        at, s = min(hits)
        text = text[: at + len(s)] if keep_stop else text[:at]
        finish = "stop_sequence"
    return Generated(text, count_tokens(text) if text.strip() else 0, finish)


@dataclass
class _State:
    adapters: set[str]
    loadable_paths: set[str]
    latency_s: float = 0.0
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = ("429:0.05", "500", "503")
    rng: random.Random = field(default_factory=random.Random)
    queue: collections.deque[Fault] = field(default_factory=collections.deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    served: int = 0
    faults_served: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


class ScriptedTGI(ServedInThread):
    """A TGI- and OpenAI-compatible server on loopback with canned, deterministic answers and scripted faults."""

    server_name = "scripted TGI"

    def __init__(
        self,
        *,
        adapters: Iterable[str] = (),
        model_id: str = "scripted/base-model",
        max_total_tokens: int = 4096,
        max_input_tokens: int | None = None,
        answer_tokens: int = 8,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = ("429:0.05", "500", "503"),
        seed: int = 0,
        unknown_adapter_status: int = 422,
        silent_unknown_adapter: bool = False,
        loadable_paths: Iterable[str] = (),
        runtime_lora: bool = True,
        include_usage: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Configure the server; `start()` (or `with`) serves it. Knobs are described in the module docstring."""
        self.model_id = model_id
        self.max_total_tokens = max_total_tokens
        self.max_input_tokens = max_total_tokens - 1 if max_input_tokens is None else max_input_tokens
        self.answer_tokens = answer_tokens
        self.unknown_adapter_status = unknown_adapter_status
        self.silent_unknown_adapter = silent_unknown_adapter
        self.runtime_lora = runtime_lora
        self.include_usage = include_usage
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._state = _State(
            adapters=set(adapters),
            loadable_paths=set(loadable_paths),
            latency_s=latency_s,
            fault_rate=fault_rate,
            fault_kinds=fault_kinds,
            rng=random.Random(seed),
        )
        self.app = self._build_app()

    # ---- knobs and statistics (thread-safe; usable while the server runs) ----

    @property
    def base_url(self) -> str:
        """TGI's base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{self.base_url}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every generation or adapter-loading request (`route`, `body`, `authorization`), in arrival order."""
        with self._lock:
            return list(self._state.requests)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The bodies of `requests`."""
        return [request["body"] for request in self.requests]

    @property
    def served(self) -> int:
        """How many requests got a normal answer (200)."""
        with self._lock:
            return self._state.served

    @property
    def faults_served(self) -> int:
        """How many requests got a scripted fault instead of an answer."""
        with self._lock:
            return self._state.faults_served

    @property
    def max_in_flight(self) -> int:
        """The most generation requests the server was handling at once."""
        with self._lock:
            return self._state.max_in_flight

    @property
    def adapters(self) -> set[str]:
        """The adapter ids (model names on the OpenAI route) being served, besides the base model."""
        with self._lock:
            return set(self._state.adapters)

    @property
    def latency_s(self) -> float:
        """Delay before every generation answer."""
        return self._state.latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        with self._lock:
            self._state.latency_s = value

    @property
    def fault_rate(self) -> float:
        """Probability that a request without a scripted fault gets a random one from `fault_kinds`."""
        return self._state.fault_rate

    @fault_rate.setter
    def fault_rate(self, value: float) -> None:
        with self._lock:
            self._state.fault_rate = value

    def script(self, *faults: Fault | str | int) -> None:
        """Queue faults (see `Fault.parse`); each is consumed by one request, in order, before any random fault."""
        parsed = [Fault.parse(f) for f in faults]
        with self._lock:
            self._state.queue.extend(parsed)

    def clear(self) -> None:
        """Forget received requests, queued faults and statistics."""
        with self._lock:
            self._state.requests.clear()
            self._state.queue.clear()
            self._state.served = self._state.faults_served = 0
            self._state.max_in_flight = self._state.in_flight

    # ---- lifecycle ----

    # ---- the HTTP app ----

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="scripted-tgi", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/info")
        async def info() -> dict[str, Any]:
            return {
                "model_id": self.model_id,
                "model_sha": None,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": 128,
                "max_best_of": 2,
                "max_stop_sequences": MAX_STOP_SEQUENCES,
                "max_input_tokens": self.max_input_tokens,
                "max_total_tokens": self.max_total_tokens,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": "3.3.0-scripted",
            }

        @app.post("/")
        @app.post("/generate")
        async def generate_route(request: Request) -> Response:
            body = await _json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
                return _tgi_error(422, "Input validation error: expected an object with `inputs`", "validation")
            return await self._guarded(request, body, self._generate)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            names = [self.model_id, *sorted(self.adapters)]
            return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tests"} for n in names]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await _json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return _openai_error(400, "expected an object with a 'messages' list", "BadRequestError")
            return await self._guarded(request, body, self._chat, openai=True)

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> Response:
            if not self.runtime_lora:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            body = await _json_body(request)
            if not isinstance(body, dict):
                return _openai_error(400, "expected a JSON object", "BadRequestError")
            return await self._guarded(request, body, self._load_lora, openai=True)

        return app

    async def _guarded(self, request: Request, body: dict[str, Any], handler: Any, *, openai: bool = False) -> Response:
        """Record the request, apply latency and any fault, then answer with `handler(body)`."""
        with self._lock:
            self._state.requests.append(
                {"route": request.url.path, "body": body, "authorization": request.headers.get("authorization")}
            )
            fault = self._next_fault()
            latency = self._state.latency_s
            self._state.in_flight += 1
            self._state.max_in_flight = max(self._state.max_in_flight, self._state.in_flight)
            if fault is not None:
                self._state.faults_served += 1
        try:
            if latency > 0:
                await asyncio.sleep(latency)
            if fault is not None and fault.kind == "delay":
                await asyncio.sleep(fault.seconds)
                fault = None
            if fault is not None and fault.kind == "status":
                return _fault_response(fault, openai=openai)
            if fault is not None and fault.kind == "garbage":
                return PlainTextResponse("<html>502 Bad Gateway</html>", media_type="application/json")
            response: Response = handler(body)
            if response.status_code == 200:
                with self._lock:
                    self._state.served += 1
            return response
        finally:
            with self._lock:
                self._state.in_flight -= 1

    def _next_fault(self) -> Fault | None:
        state = self._state
        if state.queue:
            return state.queue.popleft()
        if state.fault_rate > 0 and state.rng.random() < state.fault_rate:
            return Fault.parse(state.rng.choice(state.fault_kinds))
        return None

    # ---- TGI ----

    def _generate(self, body: dict[str, Any]) -> Response:
        inputs: str = body["inputs"]
        params: dict[str, Any] = body.get("parameters") or {}
        if problem := self._validate_tgi(inputs, params):
            return _tgi_error(422, problem, "validation")
        adapter = params.get("adapter_id")
        if adapter is not None and adapter not in self.adapters:
            if not self.silent_unknown_adapter:
                loaded = ", ".join(sorted(self.adapters)) or "none"
                message = f"Adapter `{adapter}` is not loaded (loaded adapters: {loaded})"
                return _tgi_error(self.unknown_adapter_status, message, "validation")
            adapter = None  # TGI's behaviour: unknown ids get the base model
        sampling = bool(params.get("do_sample")) or params.get("temperature") is not None
        seed = params.get("seed") if sampling else None
        answer = scripted_answer(inputs, adapter, seed, self.answer_tokens)
        out = generate(answer, int(params.get("max_new_tokens") or 20), params.get("stop") or (), keep_stop=True)
        words = out.text.split(" ") if out.text else []
        details = {
            "finish_reason": out.finish_reason,
            "generated_tokens": out.tokens,
            "seed": seed,
            "prefill": [],
            "tokens": [
                {"id": 1000 + i, "text": (" " if i else "") + w, "logprob": -0.1, "special": False}
                for i, w in enumerate(words)
            ],
        }
        result: dict[str, Any] = {"generated_text": out.text}
        if params.get("details"):
            result["details"] = details
        # TGI's `/` compat route and `/generate` answer a single object (the compat route a list for best_of > 1).
        return JSONResponse(result)

    def _validate_tgi(self, inputs: str, params: dict[str, Any]) -> str | None:
        """TGI router's validation messages for the parameters this server understands."""
        temperature = params.get("temperature")
        if temperature is not None and temperature <= 0:
            return "Input validation error: `temperature` must be strictly positive"
        top_p = params.get("top_p")
        if top_p is not None and not 0 < top_p < 1:
            return "Input validation error: `top_p` must be > 0.0 and < 1.0"
        max_new = params.get("max_new_tokens") or 20
        if max_new <= 0:
            return "Input validation error: `max_new_tokens` must be strictly positive"
        stop = params.get("stop") or []
        if len(stop) > MAX_STOP_SEQUENCES:
            return (
                f"Input validation error: `stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(stop)}"
            )
        tokens = count_tokens(inputs)
        if tokens > self.max_input_tokens:
            return (
                f"Input validation error: `inputs` must have less than {self.max_input_tokens} tokens. Given: {tokens}"
            )
        if tokens + max_new > self.max_total_tokens:
            return (
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {tokens} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        return None

    # ---- OpenAI-compatible (vLLM) ----

    def _chat(self, body: dict[str, Any]) -> Response:
        model = str(body.get("model") or "")
        if model in (self.model_id, "tgi"):
            adapter = None
        elif model in self.adapters:
            adapter = model
        else:
            return _openai_error(404, f"The model `{model}` does not exist.", "NotFoundError")
        prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in body["messages"] if isinstance(m, dict))
        prompt_tokens = count_tokens(prompt)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if prompt_tokens + max_tokens > self.max_total_tokens:
            return _openai_error(
                400,
                f"This model's maximum context length is {self.max_total_tokens} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                "BadRequestError",
            )
        n = int(body.get("n") or 1)
        temperature = body.get("temperature")
        seed = body.get("seed") if temperature is None or temperature > 0 else None
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        choices = []
        completion_tokens = 0
        for index in range(n):
            answer = scripted_answer(prompt, adapter, None if seed is None else seed + index, self.answer_tokens)
            out = generate(answer, max_tokens, stop, keep_stop=False)
            completion_tokens += out.tokens
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": out.text},
                    "finish_reason": "length" if out.finish_reason == "length" else "stop",
                    "logprobs": None,
                }
            )
        result: dict[str, Any] = {
            "id": f"chatcmpl-scripted-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
        }
        if self.include_usage:
            result["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        return JSONResponse(result)

    def _load_lora(self, body: dict[str, Any]) -> Response:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return _openai_error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        with self._lock:
            if name in self._state.adapters:
                return _openai_error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            if path not in self._state.loadable_paths:
                return _openai_error(400, f"Loading lora {name} failed: No adapter found for {path}", "BadRequestError")
            self._state.adapters.add(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _tgi_error(status: int, message: str, error_type: str) -> Response:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


def _openai_error(status: int, message: str, kind: str) -> Response:
    return JSONResponse(
        {"object": "error", "message": message, "type": kind, "param": None, "code": status}, status_code=status
    )


def _fault_response(fault: Fault, *, openai: bool) -> Response:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
    status = fault.status
    if openai:
        kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        return JSONResponse(
            {"error": {"message": f"scripted HTTP {status}", "type": kind, "param": None, "code": None}},
            status_code=status,
            headers=headers,
        )
    if status == 429:
        return JSONResponse({"error": "Model is overloaded", "error_type": "overloaded"}, status, headers=headers)
    if status == 500:
        return JSONResponse(
            {"error": "Request failed during generation: scripted", "error_type": "incomplete_generation"},
            status,
            headers=headers,
        )
    if status >= 500:
        return PlainTextResponse(f"<html>{status} scripted proxy error</html>", status, headers=headers)
    return JSONResponse({"error": f"scripted HTTP {status}", "error_type": "validation"}, status, headers=headers)


@contextlib.contextmanager
def scripted_tgi(**kwargs: Any) -> Iterator[ScriptedTGI]:
    """`ScriptedTGI(**kwargs)` as a plain context manager (for fixtures)."""
    with ScriptedTGI(**kwargs) as server:
        yield server
