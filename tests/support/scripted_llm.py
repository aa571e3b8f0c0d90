"""A scripted OpenAI-compatible chat server for tests: real HTTP on loopback, canned JSON answers, injected faults.

In a test::

    with ScriptedLLM(judge_score=80) as llm:
        llm.script(Fault.rate_limit(1.0), "500", "malformed")
        ...  # point a client at llm.base_url

Standalone (end-to-end runs)::

    python -m tests.support.scripted_llm --port 8099 --judge-score 80 --fault-rate 0.1 --seed 0

It answers `POST /v1/chat/completions`. A request whose `response_format` schema is named `judgment` gets
`{"similarity", "precision", "reason"}`; one named `synthetic_pairs` gets `{"pairs": [...]}` with as many new,
distinct pairs as the schema's `maxItems`, derived from the seed pair in the prompt. Without `response_format` the
schema name is looked for in the prompt and the JSON comes wrapped in prose, like a chat model that ignores formats.
`POST /scripted/config` changes `judge_score`, `fault_rate`, `latency_s`, `rpm_limit` and the fault queue of a
running server; `GET /scripted/stats` reports request counts.

Billing view (what a provider would charge): `answered` holds every request that got a usable completion while its
client was still connected (`served` counts them); a client that hung up first (its timeout fired, or its process
was killed) is counted in `abandoned` and is not billed. Fault outcomes are tallied per kind in `fault_counts`.

Rate limit: with `rpm_limit`, a request arriving when `rpm_limit` requests were accepted in the last `rate_window_s`
seconds (a sliding window, 60 s by default) gets an immediate 429 with `Retry-After` set to the seconds until the
oldest of them leaves the window. Rejected requests do not count against the window.

Logprobs: a request with `logprobs: true` gets `choices[0].logprobs.content`, one entry per token of the content
(unless `supports_logprobs=False`: then it is ignored, as many servers do). Tokens are simple, not a real tokenizer:
JSON punctuation, words and whole numbers (a number is one token), each with the whitespace before it, so
concatenating the tokens gives back the content. Every token has probability 0.99, except the score of a `judgment`
(the number after `"similarity":` or `"precision":`): the true value has p=0.6 and the neighbouring scores ±5 and
±10 share the rest (see `SCORE_ALTERNATIVES`), so the probability-weighted score of a mid-range value equals it and
one near 1 or 100 is pulled inwards. `top_logprobs` alternatives are listed most likely first, the token itself
included.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from tests.support.live_server import ServedInThread

FaultKind = Literal["status", "delay", "malformed", "garbage", "refuse_schema", "refuse_logprobs"]
JudgeScore = int | Callable[[dict[str, Any]], int | tuple[int, int]]
PairsFactory = Callable[[dict[str, Any], int], list[dict[str, str]]]
_SEED_INSTRUCTION = re.compile(r"<example_instruction>\s*(.*?)\s*</example_instruction>", re.DOTALL)
_MAX_ITEMS = re.compile(r'"maxItems"\s*:\s*(\d+)')
_TOKEN = re.compile(r"\s*(?:\d+|[A-Za-z_]+|[^\sA-Za-z_\d])|\s+")
SCORE_METRICS = ("similarity", "precision")
SCORE_PROBABILITY = 0.6
"""Probability of the true score's token in a judgment's logprobs."""
SCORE_ALTERNATIVES: dict[int, float] = {-5: 0.12, 5: 0.12, -10: 0.08, 10: 0.08}
"""Offsets from the true score and their share of the remaining probability (renormalised where one leaves 1-100)."""
PLAIN_LOGPROB = math.log(0.99)


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour, consumed by the next request."""

    kind: FaultKind
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0

    @classmethod
    def rate_limit(cls, retry_after: float | str | None = 1.0) -> Fault:
        """HTTP 429 with `Retry-After` (seconds, or an HTTP date string; None for no header)."""
        return cls("status", status=429, retry_after=None if retry_after is None else str(retry_after))

    @classmethod
    def error(cls, status: int = 500, retry_after: float | str | None = None) -> Fault:
        """An HTTP error status (500, 503, 400, 401 ...)."""
        return cls("status", status=status, retry_after=None if retry_after is None else str(retry_after))

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Answer normally after `seconds` (a client with a shorter timeout sees a timeout)."""
        return cls("delay", seconds=seconds)

    @classmethod
    def malformed(cls) -> Fault:
        """A valid completion whose message content is not JSON."""
        return cls("malformed")

    @classmethod
    def garbage(cls) -> Fault:
        """A 200 response whose body is not JSON at all."""
        return cls("garbage")

    @classmethod
    def parse(cls, value: Fault | str | int) -> Fault:
        """A fault from shorthand: 429, "429:2.5" (Retry-After), 500, "timeout:3", "delay:3", "malformed", "garbage".

        Also "refuse_schema" and "refuse_logprobs": a 400 naming the feature, when the request uses it.
        """
        if isinstance(value, Fault):
            return value
        text = str(value).strip().lower()
        head, _, arg = text.partition(":")
        if head.isdigit():
            status = int(head)
            if status == 429:
                return cls.rate_limit(arg or "1")
            return cls.error(status, arg or None)
        if head in ("timeout", "delay"):
            return cls.delay(float(arg or "5"))
        if head == "malformed":
            return cls.malformed()
        if head == "garbage":
            return cls.garbage()
        if head == "refuse_schema":
            return cls("refuse_schema", status=400)
        if head == "refuse_logprobs":
            return cls("refuse_logprobs", status=400)
        raise ValueError(f"unknown fault {value!r}")


@dataclass
class _State:
    judge_score: JudgeScore = 80
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = ("429:0.05", "500", "malformed")
    latency_s: float = 0.0
    supports_json_schema: bool = True
    supports_logprobs: bool = True
    pairs_factory: PairsFactory | None = None
    rng: random.Random = field(default_factory=random.Random)
    queue: collections.deque[Fault] = field(default_factory=collections.deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    served: int = 0
    faults_served: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    pairs_made: int = 0
    rpm_limit: int | None = None
    rate_window_s: float = 60.0
    accepted: collections.deque[float] = field(default_factory=collections.deque)
    rate_limited: int = 0
    answered: list[dict[str, Any]] = field(default_factory=list)
    abandoned: int = 0
    fault_counts: collections.Counter[str] = field(default_factory=collections.Counter)


def _prompt_text(body: dict[str, Any]) -> str:
    parts = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(parts)


def _schema_of(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        return spec.get("name"), spec.get("schema")
    text = _prompt_text(body)
    for name in ("synthetic_pairs", "judgment"):
        if name in text:
            return name, None
    return None, None


_WORDS = [
    "add",
    "fix",
    "update",
    "remove",
    "rename",
    "move",
    "split",
    "merge",
    "guard",
    "retry",
    "cache",
    "parse",
    "render",
    "validate",
    "log",
    "trace",
    "config",
    "parser",
    "client",
    "server",
    "queue",
    "worker",
    "handler",
    "router",
    "schema",
    "token",
    "session",
    "upload",
    "export",
    "import",
    "timeout",
    "limit",
    "buffer",
    "index",
    "report",
    "button",
    "modal",
    "layout",
    "header",
    "footer",
    "sidebar",
    "locale",
    "currency",
    "date",
    "quickly",
    "safely",
    "again",
    "only",
    "once",
    "early",
    "lazily",
    "strictly",
]


def _varied_words(n: int, length: int = 9) -> str:
    """A deterministic, distinct-enough word sequence for answer `n`."""
    digest = hashlib.sha256(str(n).encode()).digest()
    return " ".join(_WORDS[byte % len(_WORDS)] for byte in digest[:length])


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def tokenize(text: str) -> list[str]:
    """The scripted server's tokens: JSON punctuation, words, whole numbers, each with its leading whitespace."""
    return _TOKEN.findall(text)


def _score_alternatives(token: str) -> list[tuple[str, float]]:
    """The candidates at a score's position, most likely first: the true value and its neighbours."""
    prefix = token[: len(token) - len(token.lstrip())]
    value = int(token.strip())
    neighbours = {value + offset: share for offset, share in SCORE_ALTERNATIVES.items() if 1 <= value + offset <= 100}
    total = sum(neighbours.values())
    candidates = [(token, SCORE_PROBABILITY)]
    if total > 0:
        candidates += [
            (f"{prefix}{score}", (1.0 - SCORE_PROBABILITY) * share / total) for score, share in neighbours.items()
        ]
    else:
        candidates = [(token, 1.0)]
    return sorted(candidates, key=lambda item: -item[1])


def token_logprobs(content: str, top_logprobs: int, *, judgment: bool) -> list[dict[str, Any]]:
    """OpenAI-shaped `logprobs.content` for `content` (see the module docstring for the numbers)."""
    entries: list[dict[str, Any]] = []
    key: str | None = None
    previous = ""
    for token in tokenize(content):
        bare = token.strip()
        is_score = judgment and bare.isdigit() and previous == ":" and key in SCORE_METRICS
        candidates = _score_alternatives(token) if is_score else [(token, math.exp(PLAIN_LOGPROB))]
        if bare and (bare[0].isalpha() or bare[0] == "_"):
            key = bare
        if bare:
            previous = bare
        chosen = dict(candidates)[token]
        entries.append(
            {
                "token": token,
                "logprob": math.log(chosen),
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": alt, "logprob": math.log(p), "bytes": list(alt.encode())}
                    for alt, p in candidates[:top_logprobs]
                ],
            }
        )
    return entries


class ScriptedLLM(ServedInThread):
    """A scripted OpenAI-compatible server on 127.0.0.1, run in a background thread (a context manager)."""

    server_name = "scripted LLM"

    def __init__(
        self,
        *,
        judge_score: JudgeScore = 80,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = ("429:0.05", "500", "malformed"),
        seed: int = 0,
        latency_s: float = 0.0,
        supports_json_schema: bool = True,
        supports_logprobs: bool = True,
        pairs_factory: PairsFactory | None = None,
        rpm_limit: int | None = None,
        rate_window_s: float = 60.0,
        port: int = 0,
        host: str = "127.0.0.1",
        model: str = "scripted-llm",
    ) -> None:
        self._lock = threading.Lock()
        self._knobs: dict[str, Any] = {
            "judge_score": judge_score,
            "fault_rate": fault_rate,
            "fault_kinds": fault_kinds,
            "latency_s": latency_s,
            "supports_json_schema": supports_json_schema,
            "supports_logprobs": supports_logprobs,
            "pairs_factory": pairs_factory,
            "rpm_limit": rpm_limit,
            "rate_window_s": rate_window_s,
        }
        self._seed = seed
        self._state = _State(**self._knobs, rng=random.Random(seed))
        self.host = host
        self.port = port
        self.model = model
        self.app = self._build_app()

    # ---- knobs (thread-safe; usable while the server runs) ----

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every received request body, in arrival order (a copy)."""
        with self._lock:
            return list(self._state.requests)

    @property
    def max_in_flight(self) -> int:
        """The most requests the server was handling at once."""
        with self._lock:
            return self._state.max_in_flight

    @property
    def faults_served(self) -> int:
        """How many requests got a fault instead of an answer."""
        with self._lock:
            return self._state.faults_served

    @property
    def answered(self) -> list[dict[str, Any]]:
        """Request bodies that got a completion while their client was still connected: the billable calls."""
        with self._lock:
            return list(self._state.answered)

    @property
    def abandoned(self) -> int:
        """Requests whose client hung up before the answer was ready (timed out or died): not billed."""
        with self._lock:
            return self._state.abandoned

    @property
    def fault_counts(self) -> dict[str, int]:
        """Faults served, by kind: `429`, `500` (any status), `delay`, `malformed`, `garbage` ..."""
        with self._lock:
            return dict(self._state.fault_counts)

    @property
    def rate_limited(self) -> int:
        """How many requests got a 429 from the `rpm_limit` window (scripted 429 faults not included)."""
        with self._lock:
            return self._state.rate_limited

    @property
    def rpm_limit(self) -> int | None:
        """Requests accepted per `rate_window_s` sliding window; None for no limit."""
        return self._state.rpm_limit

    @rpm_limit.setter
    def rpm_limit(self, value: int | None) -> None:
        with self._lock:
            self._state.rpm_limit = value

    @property
    def judge_score(self) -> JudgeScore:
        """The score every judgment gets: an int, or a function of the request body (int or (sim, prec))."""
        return self._state.judge_score

    @judge_score.setter
    def judge_score(self, value: JudgeScore) -> None:
        with self._lock:
            self._state.judge_score = value

    @property
    def fault_rate(self) -> float:
        """Probability that a request without a scripted fault gets a random one from `fault_kinds`."""
        return self._state.fault_rate

    @fault_rate.setter
    def fault_rate(self, value: float) -> None:
        with self._lock:
            self._state.fault_rate = value

    @property
    def latency_s(self) -> float:
        """Delay before every answer."""
        return self._state.latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        with self._lock:
            self._state.latency_s = value

    @property
    def pairs_factory(self) -> PairsFactory | None:
        """Replaces the default synthetic pairs: called with the request body and the requested count."""
        return self._state.pairs_factory

    @pairs_factory.setter
    def pairs_factory(self, value: PairsFactory | None) -> None:
        with self._lock:
            self._state.pairs_factory = value

    def script(self, *faults: Fault | str | int) -> None:
        """Queue faults; each is consumed by one request, in order, before any random fault."""
        parsed = [Fault.parse(f) for f in faults]
        with self._lock:
            self._state.queue.extend(parsed)

    def reset(self) -> None:
        """Back to the constructor's knobs, with no requests, faults or statistics (to share one server)."""
        with self._lock:
            in_flight = self._state.in_flight
            self._state = _State(**self._knobs, rng=random.Random(self._seed))
            self._state.in_flight = self._state.max_in_flight = in_flight

    def clear(self) -> None:
        """Forget received requests and queued faults."""
        with self._lock:
            self._state.requests.clear()
            self._state.answered.clear()
            self._state.queue.clear()
            self._state.max_in_flight = 0

    def prompts_text(self) -> str:
        """All message text received so far, concatenated (to assert what never reached the service LLM)."""
        return "\n".join(_prompt_text(body) for body in self.requests)

    # ---- lifecycle ----

    # ---- the HTTP app ----

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="scripted-llm", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        @app.get("/v1/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "tests"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "request body is not JSON")
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return _error(400, "expected an object with a 'messages' list")
            return await self._handle(body, request.is_disconnected)

        @app.post("/scripted/config")
        async def configure(request: Request) -> dict[str, Any]:
            update = await request.json()
            with self._lock:
                if "judge_score" in update:
                    self._state.judge_score = int(update["judge_score"])
                if "fault_rate" in update:
                    self._state.fault_rate = float(update["fault_rate"])
                if "latency_s" in update:
                    self._state.latency_s = float(update["latency_s"])
                if "rpm_limit" in update:
                    self._state.rpm_limit = None if update["rpm_limit"] is None else int(update["rpm_limit"])
                if "seed" in update:
                    self._state.rng = random.Random(int(update["seed"]))
            self.script(*update.get("faults", []))
            return {"ok": True}

        @app.get("/scripted/stats")
        async def stats() -> dict[str, Any]:
            with self._lock:
                return {
                    "requests": len(self._state.requests),
                    "served": self._state.served,
                    "faults_served": self._state.faults_served,
                    "max_in_flight": self._state.max_in_flight,
                    "queued_faults": len(self._state.queue),
                    "rate_limited": self._state.rate_limited,
                    "abandoned": self._state.abandoned,
                    "fault_counts": dict(self._state.fault_counts),
                }

        return app

    def _next_fault(self) -> Fault | None:
        state = self._state
        if state.queue:
            return state.queue.popleft()
        if state.fault_rate > 0 and state.rng.random() < state.fault_rate:
            return Fault.parse(state.rng.choice(state.fault_kinds))
        return None

    def _over_rate(self) -> float | None:
        """Seconds until a slot frees when the window is full (the request is then rejected), else None (counted)."""
        state = self._state
        if state.rpm_limit is None:
            return None
        now = time.monotonic()
        while state.accepted and state.accepted[0] <= now - state.rate_window_s:
            state.accepted.popleft()
        if len(state.accepted) >= state.rpm_limit:
            state.rate_limited += 1
            return max(0.001, state.accepted[0] + state.rate_window_s - now)
        state.accepted.append(now)
        return None

    async def _handle(
        self, body: dict[str, Any], disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> Response:
        with self._lock:
            self._state.requests.append(body)
            number = len(self._state.requests)
            wait = self._over_rate()
        if wait is not None:
            # Rejected at once, before any latency, like a provider's rate limiter in front of its model servers.
            return _error(429, "scripted rate limit reached", headers={"Retry-After": f"{wait:.3f}"})
        with self._lock:
            fault = self._next_fault()
            latency = self._state.latency_s
            self._state.in_flight += 1
            self._state.max_in_flight = max(self._state.max_in_flight, self._state.in_flight)
            if fault is not None:
                self._state.faults_served += 1
                self._state.fault_counts[str(fault.status) if fault.kind == "status" else fault.kind] += 1
        try:
            if latency > 0:
                await asyncio.sleep(latency)
            if fault is not None and fault.kind == "delay":
                await asyncio.sleep(fault.seconds)
                fault = None
            if fault is not None and fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                return _error(fault.status, f"scripted HTTP {fault.status}", headers=headers)
            if fault is not None and fault.kind == "garbage":
                return PlainTextResponse("<html>502 Bad Gateway</html>", media_type="application/json")
            structured = isinstance(body.get("response_format"), dict)
            if (
                structured
                and body["response_format"].get("type") == "json_schema"
                and (not self._state.supports_json_schema or (fault is not None and fault.kind == "refuse_schema"))
            ):
                return _error(400, "response_format json_schema is not supported here", param="response_format")
            if fault is not None and fault.kind == "refuse_logprobs" and body.get("logprobs"):
                return _error(400, "logprobs are not supported for this model", param="logprobs")
            if fault is not None and fault.kind == "malformed":
                content = 'Sure! Here is my answer: {"similarity": eighty, oops'
            else:
                content = self._answer(body, number)
                if not structured:
                    content = f"Here is the JSON you asked for:\n```json\n{content}\n```\nLet me know if you need more."
            if disconnected is not None and await disconnected():
                # The client gave up (its timeout, or its process died) before the answer: nothing to bill.
                with self._lock:
                    self._state.abandoned += 1
                return _error(499, "client closed the request")
            with self._lock:
                self._state.served += 1
                self._state.answered.append(body)
            return JSONResponse(self._completion(body, content, number))
        finally:
            with self._lock:
                self._state.in_flight -= 1

    def _answer(self, body: dict[str, Any], number: int) -> str:
        name, schema = _schema_of(body)
        if name == "judgment":
            score = self._state.judge_score
            value = score(body) if callable(score) else score
            similarity, precision = value if isinstance(value, tuple) else (value, value)
            return json.dumps(
                {
                    "similarity": int(similarity),
                    "precision": int(precision),
                    "reason": f"scripted judgment {number}",
                }
            )
        if name == "synthetic_pairs":
            return json.dumps({"pairs": self._pairs(body, schema)})
        return json.dumps({"answer": f"scripted reply {number}"})

    def _pairs(self, body: dict[str, Any], schema: dict[str, Any] | None) -> list[dict[str, str]]:
        text = _prompt_text(body)
        count = 3
        if schema is not None:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                count = int(schema["properties"]["pairs"]["maxItems"])
        elif match := _MAX_ITEMS.search(text):
            count = int(match.group(1))
        if self._state.pairs_factory is not None:
            return self._state.pairs_factory(body, count)
        match = _SEED_INSTRUCTION.search(text)
        topic = (match.group(1).strip() if match else "") or hashlib.sha256(text.encode()).hexdigest()[:12]
        topic = " ".join(topic.split())[:80]
        with self._lock:
            start = self._state.pairs_made
            self._state.pairs_made += count
        # A global counter keeps every pair new, and the words of each answer are drawn from it, so neither exact
        # nor near-duplicate detection drops a whole reply.
        return [
            {"instruction": f"Variation {n} of: {topic}", "response": f"{_varied_words(n)}."}
            for n in range(start + 1, start + count + 1)
        ]

    def _completion(self, body: dict[str, Any], content: str, number: int) -> dict[str, Any]:
        prompt_tokens = _tokens(_prompt_text(body))
        completion_tokens = _tokens(content)
        logprobs = None
        if body.get("logprobs") and self._state.supports_logprobs:
            top = int(body.get("top_logprobs") or 0)
            logprobs = {"content": token_logprobs(content, top, judgment=_schema_of(body)[0] == "judgment")}
        return {
            "id": f"chatcmpl-scripted-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model") or self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": logprobs,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _error(status: int, message: str, *, headers: dict[str, str] | None = None, param: str | None = None) -> Response:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status, headers=headers
    )


@contextlib.contextmanager
def scripted_llm(**kwargs: Any) -> Iterator[ScriptedLLM]:
    """`ScriptedLLM(**kwargs)` as a plain context manager (for fixtures)."""
    with ScriptedLLM(**kwargs) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    """Serve in the foreground until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.scripted_llm", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--judge-score", type=int, default=80)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--fault-kinds", default="429:0.05,500,malformed", help="comma-separated fault shorthands")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--rpm-limit", type=int, default=None, help="429 beyond this many requests a minute")
    parser.add_argument("--no-json-schema", action="store_true", help="refuse response_format json_schema (HTTP 400)")
    args = parser.parse_args(argv)
    server = ScriptedLLM(
        judge_score=args.judge_score,
        fault_rate=args.fault_rate,
        fault_kinds=tuple(k for k in args.fault_kinds.split(",") if k),
        seed=args.seed,
        latency_s=args.latency,
        supports_json_schema=not args.no_json_schema,
        rpm_limit=args.rpm_limit,
        port=args.port,
        host=args.host,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(server.app, log_level="warning", access_log=False, lifespan="off")
    # Bound before the line is printed, so a parent process may connect as soon as it reads it (--port 0 works).
    print(f"scripted LLM listening on http://{args.host}:{port}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
