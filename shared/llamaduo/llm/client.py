"""The service-LLM client: JSON replies over the OpenAI chat API, with retries, re-asks, a request cache and costs."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, cast, overload

import openai
from openai.types.chat import ChatCompletion

from llamaduo.contract.events import Spend
from llamaduo.llm.settings import ResolvedLLM
from llamaduo.store.base import ArtifactError, ArtifactStore, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

REASKS = 2
"""Extra attempts after a reply that does not parse or validate."""
CACHE_PREFIX = "llm-cache"
_SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
# Per-item request errors: this request is bad (too long, rejected), not the whole configuration.
ITEM_ERROR_STATUS = frozenset({400, 413, 422})
_STRUCTURED_HINTS = ("response_format", "json_schema", "response_schema", "structured output", "guided")


class LLMError(Exception):
    """Base of the client's errors; messages never contain the API key."""


class LLMUnavailable(LLMError):
    """Transient faults (429, 5xx, timeouts, connection errors) outlasted every retry; try the task again later."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LLMRequestError(LLMError):
    """The server refused the request (a 4xx other than 408/409/425/429); retrying the same request will not help."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code

    @property
    def item_level(self) -> bool:
        """Whether the refusal concerns this request's content rather than credentials or configuration."""
        return self.status_code in ITEM_ERROR_STATUS


@dataclass(frozen=True)
class Usage:
    """Tokens of one or more completions."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True)
class LLMReply(Generic[T]):
    """A parsed reply, what it cost (re-asks included), and whether it came from the cache."""

    value: T
    text: str
    usage: Usage
    usd: float
    cached: bool
    requests: int = 1
    cached_requests: int = 0

    @property
    def spend(self) -> Spend:
        """This reply's share of the migration's spend."""
        return Spend(
            calls=self.requests,
            cached_calls=self.cached_requests,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
            usd=self.usd,
        )


class LLMReplyError(LLMError):
    """No attempt produced a reply that parsed and validated; the tokens were still spent."""

    def __init__(self, message: str, *, usage: Usage, usd: float, requests: int, cached_requests: int) -> None:
        super().__init__(message)
        self.usage = usage
        self.usd = usd
        self.requests = requests
        self.cached_requests = cached_requests

    @property
    def spend(self) -> Spend:
        """What the failed attempts cost."""
        return Spend(
            calls=self.requests,
            cached_calls=self.cached_requests,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
            usd=self.usd,
        )


class Ledger:
    """Accumulates the spend of replies and failed replies into one `Spend`."""

    def __init__(self) -> None:
        self._spend = Spend()

    def add(self, item: LLMReply[Any] | LLMReplyError | Spend) -> None:
        """Charge a reply (cached ones too: a redelivered task reports its output's full spend once)."""
        self._spend = self._spend + (item if isinstance(item, Spend) else item.spend)

    @property
    def spend(self) -> Spend:
        """The total so far."""
        return self._spend


def extract_json(text: str) -> Any:
    """The reply as JSON, or else the first JSON object or array embedded in it (prose, code fences)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        return value
    raise ValueError("the reply contains no JSON object or array")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds a `Retry-After` (seconds or HTTP date) or `retry-after-ms` header asks us to wait, if any."""
    lowered = {key.lower(): value for key, value in headers.items()}
    if (millis := lowered.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def request_key(
    model: str,
    messages: Sequence[Mapping[str, str]],
    schema_name: str,
    schema: Mapping[str, Any],
    temperature: float,
    max_tokens: int,
    nonce: int,
) -> str:
    """SHA-256 of the canonical JSON of a logical request: the cache key."""
    canonical = json.dumps(
        {
            "model": model,
            "messages": [dict(m) for m in messages],
            "schema_name": schema_name,
            "schema": schema,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "nonce": nonce,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class _Completion:
    text: str
    usage: Usage
    cached: bool


class ServiceLLM:
    """An OpenAI-compatible service LLM asked for JSON, with our own retries, a cache and a concurrency bound."""

    def __init__(
        self,
        llm: ResolvedLLM,
        store: ArtifactStore,
        *,
        rng: random.Random | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.llm = llm
        self.store = store
        self._rng = rng or random.Random()
        self._secret = llm.api_key.get_secret_value() if llm.api_key is not None else ""
        # Servers without a key (vLLM, Ollama, our scripted one) ignore it; the SDK insists on a non-empty value.
        self._client = client or openai.AsyncOpenAI(
            base_url=llm.base_url,
            api_key=self._secret or "no-key",
            max_retries=0,
            timeout=llm.timeout_s,
        )
        self._semaphore = asyncio.Semaphore(llm.max_concurrency)
        self._structured = llm.supports_json_schema

    @property
    def model(self) -> str:
        """The model name every request asks for."""
        return self.llm.model

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def __aenter__(self) -> ServiceLLM:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @overload
    async def chat_json(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        schema: Mapping[str, Any],
        schema_name: str,
        validate: None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache_scope: str,
        nonce: int = 0,
    ) -> LLMReply[dict[str, Any]]: ...

    @overload
    async def chat_json(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        schema: Mapping[str, Any],
        schema_name: str,
        validate: Callable[[dict[str, Any]], T],
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache_scope: str,
        nonce: int = 0,
    ) -> LLMReply[T]: ...

    async def chat_json(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        schema: Mapping[str, Any],
        schema_name: str,
        validate: Callable[[dict[str, Any]], Any] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache_scope: str,
        nonce: int = 0,
    ) -> LLMReply[Any]:
        """Ask for a JSON object matching `schema`, re-asking up to twice when it does not parse or validate.

        Raises `LLMReplyError` when no attempt produced a valid reply, `LLMRequestError` on a refused request and
        `LLMUnavailable` when transient faults outlast the retries.
        """
        if not _SCOPE.match(cache_scope):
            raise ValueError(f"cache_scope must be a plain name such as a migration id, got {cache_scope!r}")
        temp = self.llm.temperature if temperature is None else temperature
        limit = self.llm.max_tokens if max_tokens is None else max_tokens
        conversation = [dict(m) for m in messages]
        usage = Usage()
        requests = cached_requests = 0
        problem = ""
        for _ in range(1 + REASKS):
            completion = await self._complete(conversation, schema, schema_name, temp, limit, cache_scope, nonce)
            usage += completion.usage
            requests += 1
            cached_requests += int(completion.cached)
            try:
                data = extract_json(completion.text)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got a JSON {type(data).__name__}")
                value = validate(data) if validate is not None else data
            except Exception as exc:  # a validator may raise anything; its message is what we tell the model
                problem = _scrub(f"{type(exc).__name__}: {exc}", self._secret)[:1000]
                log.info("service LLM reply for %s did not validate: %s", schema_name, problem)
                conversation = [
                    *conversation,
                    {"role": "assistant", "content": completion.text},
                    {
                        "role": "user",
                        "content": (
                            f"Your reply could not be used: {problem}\n"
                            f"Reply again with only one JSON object that matches the `{schema_name}` schema."
                        ),
                    },
                ]
                continue
            return LLMReply(
                value=value,
                text=completion.text,
                usage=usage,
                usd=self.llm.usd(usage.prompt_tokens, usage.completion_tokens),
                cached=cached_requests == requests,
                requests=requests,
                cached_requests=cached_requests,
            )
        raise LLMReplyError(
            f"no valid `{schema_name}` reply after {requests} attempts: {problem}",
            usage=usage,
            usd=self.llm.usd(usage.prompt_tokens, usage.completion_tokens),
            requests=requests,
            cached_requests=cached_requests,
        )

    async def _complete(
        self,
        conversation: list[dict[str, str]],
        schema: Mapping[str, Any],
        schema_name: str,
        temperature: float,
        max_tokens: int,
        scope: str,
        nonce: int,
    ) -> _Completion:
        """One logical completion: from the cache when this exact request was answered before, else over HTTP."""
        digest = request_key(self.llm.model, conversation, schema_name, schema, temperature, max_tokens, nonce)
        key = f"{CACHE_PREFIX}/{scope}/{digest}.json"
        cached = await self._cache_get(key)
        if cached is not None:
            return cached
        text, usage = await self._request(conversation, schema, schema_name, temperature, max_tokens)
        record = {
            "model": self.llm.model,
            "text": text,
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
        }
        try:
            await asyncio.to_thread(self.store.put_bytes, key, json.dumps(record).encode(), "application/json")
        except (ArtifactError, StoreUnavailable, OSError) as exc:
            # A reply we could not cache is still a reply; the worst case is paying for it again on redelivery.
            log.warning("could not cache a service-LLM reply under %s: %s", key, exc)
        return _Completion(text=text, usage=usage, cached=False)

    async def _cache_get(self, key: str) -> _Completion | None:
        try:
            ref = await asyncio.to_thread(self.store.head, key, "application/json")
            if ref is None:
                return None
            record = json.loads(await asyncio.to_thread(self.store.read_bytes, ref))
            usage = record["usage"]
            return _Completion(
                text=str(record["text"]),
                usage=Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])),
                cached=True,
            )
        except (ArtifactError, OSError, ValueError, KeyError, TypeError) as exc:
            # A damaged or vanished cache entry is only a lost saving: ask again and overwrite it.
            log.warning("ignoring unreadable service-LLM cache entry %s: %s", key, exc)
            return None

    def _wire_request(
        self, conversation: list[dict[str, str]], schema: Mapping[str, Any], schema_name: str
    ) -> tuple[list[dict[str, str]], dict[str, Any] | None]:
        """The messages and response_format actually sent: structured output, or the schema spelled out in words."""
        if self._structured:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": dict(schema), "strict": True},
            }
            return conversation, response_format
        instruction = (
            f"Reply with only one JSON object, no other text, that matches this JSON Schema (named `{schema_name}`):\n"
            + json.dumps(schema)
        )
        return [{"role": "system", "content": instruction}, *conversation], None

    async def _request(
        self,
        conversation: list[dict[str, str]],
        schema: Mapping[str, Any],
        schema_name: str,
        temperature: float,
        max_tokens: int,
    ) -> tuple[str, Usage]:
        """One completion over HTTP, retrying transient faults with full-jitter backoff and `Retry-After`."""
        last_problem = ""
        hint: float | None = None
        attempt = 0
        while True:
            hint = None
            messages, response_format = self._wire_request(conversation, schema, schema_name)
            kwargs: dict[str, Any] = {
                "model": self.llm.model,
                "messages": messages,
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
            if response_format is not None:
                kwargs["response_format"] = response_format
            try:
                async with self._semaphore:
                    result = await self._client.chat.completions.create(**kwargs)
                return self._read_completion(result)
            except openai.APIStatusError as exc:
                status = exc.status_code
                detail = _scrub(_status_detail(exc), self._secret)
                if status == 400 and self._structured and any(h in detail.lower() for h in _STRUCTURED_HINTS):
                    # The server does not do (this) structured output: spell the schema out and parse tolerantly.
                    log.warning("service LLM refused response_format (%s); falling back to prompted JSON", detail)
                    self._structured = False
                    continue
                if status not in _RETRYABLE_STATUS and status < 500:
                    raise LLMRequestError(f"service LLM refused the request: HTTP {status}: {detail}", status) from None
                hint = retry_after_seconds(exc.response.headers)
                last_problem = f"HTTP {status}: {detail}"
            except openai.APITimeoutError:
                last_problem = f"timed out after {self.llm.timeout_s} s"
            except openai.APIConnectionError as exc:
                last_problem = _scrub(f"connection error: {exc.__cause__ or exc}", self._secret)
            except _MalformedResponse as exc:
                last_problem = str(exc)
            except ValueError as exc:
                # The SDK raises the JSON decoder's error when a 2xx body is not JSON (a proxy's error page).
                last_problem = _scrub(f"unreadable response body: {exc}", self._secret)
            if attempt >= self.llm.max_retries:
                break
            delay = self._backoff(attempt, hint)
            log.warning(
                "service LLM attempt %d/%d failed (%s); retrying in %.2f s",
                attempt + 1,
                self.llm.max_retries + 1,
                last_problem,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1
        raise LLMUnavailable(
            f"service LLM unavailable after {self.llm.max_retries + 1} attempts: {last_problem}", retry_after_s=hint
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)], but never shorter than the server's Retry-After."""
        jitter = self._rng.uniform(0.0, min(self.llm.backoff_max_s, self.llm.backoff_base_s * 2**attempt))
        if retry_after is None:
            return jitter
        return max(min(retry_after, self.llm.max_retry_after_s), jitter)

    def _read_completion(self, result: object) -> tuple[str, Usage]:
        if not isinstance(result, ChatCompletion):
            raise _MalformedResponse("the response body is not a chat completion")
        if not result.choices:
            raise _MalformedResponse("the chat completion has no choices")
        message = result.choices[0].message
        # A refusal or an empty message is a reply that does not parse: the re-ask loop handles it.
        text = message.content if message.content is not None else (getattr(message, "refusal", None) or "")
        usage = Usage()
        if result.usage is not None:
            usage = Usage(int(result.usage.prompt_tokens or 0), int(result.usage.completion_tokens or 0))
        return cast(str, text), usage


class _MalformedResponse(Exception):
    """A 2xx response that is not a usable chat completion: treated like a transient server fault."""


def _status_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        return json.dumps(body)[:500]
    return str(exc.message)[:500]


def _scrub(text: str, secret: str) -> str:
    """The text with the API key masked, in case a server or library echoes it back."""
    return text.replace(secret, "***") if secret else text
