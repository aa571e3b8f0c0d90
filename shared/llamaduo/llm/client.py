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
from llamaduo.llm.budget import SpendCap, estimate_prompt_tokens
from llamaduo.llm.limits import RateLimits, estimate_tokens, shared_limits
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
# Statuses whose Retry-After speaks for the whole endpoint, so every caller of it pauses, not only the one told.
_PAUSE_STATUS = frozenset({429, 503})
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token the OpenAI API returns."""
KEY_VARIABLES = "LLAMADUO_SERVICE_LLM_API_KEY (or OPENAI_API_KEY)"


class LLMError(Exception):
    """Base of the client's errors; messages never contain the API key."""


class LLMUnavailable(LLMError):
    """Transient faults (429, 5xx, timeouts, connection errors) outlasted every retry; try the task again later."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LLMRequestError(LLMError):
    """The server refused the request (a 4xx other than 408/409/425/429); retrying the same request will not help.

    `reason` is machine-readable: `invalid_api_key` (401, 403), `unknown_model` (404) or `bad_request` (other 4xx).
    """

    def __init__(self, message: str, status_code: int, reason: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.reason = reason or request_error_reason(status_code)

    @property
    def item_level(self) -> bool:
        """Whether the refusal concerns this request's content rather than credentials or configuration."""
        return self.status_code in ITEM_ERROR_STATUS


def request_error_reason(status_code: int) -> str:
    """The `LLMRequestError.reason` of an HTTP status."""
    if status_code in (401, 403):
        return "invalid_api_key"
    if status_code == 404:
        return "unknown_model"
    return "bad_request"


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log probability and the most likely alternatives at its position (itself included)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class LLMStats:
    """What one client did: HTTP attempts, 429s among them, retries, cache hits, seconds waited for rate limits."""

    http_requests: int = 0
    rate_limited: int = 0
    retries: int = 0
    cache_hits: int = 0
    limiter_wait_s: float = 0.0  # summed over requests: concurrent waits add up


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
    cached_usd: float = 0.0
    """The part of `usd` whose completions came from the cache: paid once before, not again now."""
    logprobs: list[TokenLogprob] | None = None
    """Per token of `text`, when asked for with `top_logprobs` and the server returned them."""

    @property
    def spend(self) -> Spend:
        """This reply's share of the migration's spend."""
        return _spend(self.usage, self.usd, self.requests, self.cached_requests, self.cached_usd)


def _spend(usage: Usage, usd: float, requests: int, cached_requests: int, cached_usd: float) -> Spend:
    return Spend(
        calls=requests,
        cached_calls=cached_requests,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        usd=usd,
        cached_usd=cached_usd,
    )


class LLMReplyError(LLMError):
    """No attempt produced a reply that parsed and validated; the tokens were still spent."""

    def __init__(
        self,
        message: str,
        *,
        usage: Usage,
        usd: float,
        requests: int,
        cached_requests: int,
        cached_usd: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.usage = usage
        self.usd = usd
        self.requests = requests
        self.cached_requests = cached_requests
        self.cached_usd = cached_usd

    @property
    def spend(self) -> Spend:
        """What the failed attempts cost."""
        return _spend(self.usage, self.usd, self.requests, self.cached_requests, self.cached_usd)


class Ledger:
    """Accumulates the spend of replies and failed replies into one `Spend`.

    `usd` is everything the output cost, paid once; `cached_usd` is the part answered from the cache this time, so
    `usd - cached_usd` is what this run newly paid (zero for a re-run or a redelivered task).
    """

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
    top_logprobs: int | None = None,
) -> str:
    """SHA-256 of the canonical JSON of a logical request: the cache key."""
    request: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "schema_name": schema_name,
        "schema": schema,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "nonce": nonce,
    }
    # Only when asked for, so that requests without logprobs keep the keys (and cache entries) they always had.
    if top_logprobs is not None:
        request["top_logprobs"] = top_logprobs
    canonical = json.dumps(
        request,
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
    logprobs: list[TokenLogprob] | None = None


class ServiceLLM:
    """An OpenAI-compatible service LLM asked for JSON, with our own retries, a cache, and concurrency and rate limits.

    The rate limits (`requests_per_minute`, `tokens_per_minute`) and the pause after a 429 are shared by every client
    of this process that talks to the same (base_url, model); pass `limits` to give a client limits of its own.
    """

    def __init__(
        self,
        llm: ResolvedLLM,
        store: ArtifactStore,
        *,
        rng: random.Random | None = None,
        client: openai.AsyncOpenAI | None = None,
        limits: RateLimits | None = None,
        spend_cap: SpendCap | None = None,
    ) -> None:
        self.llm = llm
        # Shared by the clients of one task: calls that could pass the migration's dollar cap are never sent.
        self.spend_cap = spend_cap
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
        self._logprobs_supported = True
        self._limits = limits
        self._stats = LLMStats()

    @property
    def model(self) -> str:
        """The model name every request asks for."""
        return self.llm.model

    @property
    def stats(self) -> LLMStats:
        """What this client did on the wire so far."""
        return self._stats

    @property
    def limits(self) -> RateLimits:
        """The rate limits this client obeys (the process-wide ones of its endpoint unless it was given its own)."""
        if self._limits is None:
            # Looked up on first use, inside the event loop that the shared limits belong to.
            self._limits = shared_limits(
                self.llm.base_url,
                self.llm.model,
                requests_per_minute=self.llm.requests_per_minute,
                tokens_per_minute=self.llm.tokens_per_minute,
            )
        return self._limits

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
        top_logprobs: int | None = None,
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
        top_logprobs: int | None = None,
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
        top_logprobs: int | None = None,
    ) -> LLMReply[Any]:
        """Ask for a JSON object matching `schema`, re-asking up to twice when it does not parse or validate.

        With `top_logprobs` (0-20) the reply carries each token's log probability and that many alternatives, where
        the server returns them. Raises `LLMReplyError` when no attempt produced a valid reply, `LLMRequestError` on
        a refused request and `LLMUnavailable` when transient faults outlast the retries.
        """
        if not _SCOPE.match(cache_scope):
            raise ValueError(f"cache_scope must be a plain name such as a migration id, got {cache_scope!r}")
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be within 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
        request = _Request(
            schema=schema,
            schema_name=schema_name,
            temperature=self.llm.temperature if temperature is None else temperature,
            max_tokens=self.llm.max_tokens if max_tokens is None else max_tokens,
            scope=cache_scope,
            nonce=nonce,
            top_logprobs=top_logprobs,
        )
        conversation = [dict(m) for m in messages]
        usage = cached_usage = Usage()
        requests = cached_requests = 0
        problem = ""
        for _ in range(1 + REASKS):
            completion = await self._complete(conversation, request)
            usage += completion.usage
            requests += 1
            if completion.cached:
                cached_requests += 1
                cached_usage += completion.usage
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
                usd=self._usd(usage),
                cached=cached_requests == requests,
                requests=requests,
                cached_requests=cached_requests,
                cached_usd=self._usd(cached_usage),
                logprobs=completion.logprobs,
            )
        raise LLMReplyError(
            f"no valid `{schema_name}` reply after {requests} attempts: {problem}",
            usage=usage,
            usd=self._usd(usage),
            requests=requests,
            cached_requests=cached_requests,
            cached_usd=self._usd(cached_usage),
        )

    def _usd(self, usage: Usage) -> float:
        return self.llm.usd(usage.prompt_tokens, usage.completion_tokens)

    async def _complete(self, conversation: list[dict[str, str]], request: _Request) -> _Completion:
        """One logical completion: from the cache when this exact request was answered before, else over HTTP."""
        digest = request_key(
            self.llm.model,
            conversation,
            request.schema_name,
            request.schema,
            request.temperature,
            request.max_tokens,
            request.nonce,
            request.top_logprobs,
        )
        key = f"{CACHE_PREFIX}/{request.scope}/{digest}.json"
        cached = await self._cache_get(key)
        if cached is not None:
            self._count(cache_hits=1)
            return cached
        reserved = 0.0
        if self.spend_cap is not None:
            worst = self.llm.usd(estimate_prompt_tokens(conversation), request.max_tokens)
            reserved = self.spend_cap.reserve(worst)
        try:
            completion = await self._request(conversation, request)
        except BaseException:
            if self.spend_cap is not None:
                self.spend_cap.settle(reserved, 0.0)
            raise
        if self.spend_cap is not None:
            self.spend_cap.settle(reserved, self._usd(completion.usage))
        record = {
            "model": self.llm.model,
            "text": completion.text,
            "usage": {
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
            },
            "logprobs": _logprobs_to_json(completion.logprobs),
        }
        try:
            await asyncio.to_thread(self.store.put_bytes, key, json.dumps(record).encode(), "application/json")
        except (ArtifactError, StoreUnavailable, OSError) as exc:
            # A reply we could not cache is still a reply; the worst case is paying for it again on redelivery.
            log.warning("could not cache a service-LLM reply under %s: %s", key, exc)
        return completion

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
                logprobs=_logprobs_from_json(record.get("logprobs")),
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

    def _count(
        self,
        *,
        http_requests: int = 0,
        rate_limited: int = 0,
        retries: int = 0,
        cache_hits: int = 0,
        limiter_wait_s: float = 0.0,
    ) -> None:
        s = self._stats
        self._stats = LLMStats(
            http_requests=s.http_requests + http_requests,
            rate_limited=s.rate_limited + rate_limited,
            retries=s.retries + retries,
            cache_hits=s.cache_hits + cache_hits,
            limiter_wait_s=s.limiter_wait_s + limiter_wait_s,
        )

    def _refusal(self, status: int, detail: str) -> LLMRequestError:
        """The error of a non-retryable 4xx, worded so that an operator knows what to fix."""
        reason = request_error_reason(status)
        where = f"the service LLM at {self.llm.base_url}"
        if reason == "invalid_api_key":
            key = "the API key" if self._secret else "the request, which carried no API key,"
            message = (
                f"{where} rejected {key} (HTTP {status}: {detail}); set {KEY_VARIABLES} to a valid key for this server"
            )
        elif reason == "unknown_model":
            message = (
                f"{where} does not know model {self.llm.model!r} or the base URL is wrong (HTTP {status}: {detail}); "
                "check the model name and base URL (LLAMADUO_SERVICE_LLM_MODEL / LLAMADUO_SERVICE_LLM_BASE_URL, "
                "or the spec's service-LLM section)"
            )
        else:
            message = f"service LLM refused the request: HTTP {status}: {detail}"
        return LLMRequestError(_scrub(message, self._secret), status, reason)

    async def _request(self, conversation: list[dict[str, str]], request: _Request) -> _Completion:
        """One completion over HTTP, retrying transient faults with full-jitter backoff and `Retry-After`."""
        last_problem = ""
        hint: float | None = None
        attempt = 0
        limits = self.limits
        while True:
            hint = None
            messages, response_format = self._wire_request(conversation, request.schema, request.schema_name)
            kwargs: dict[str, Any] = {
                "model": self.llm.model,
                "messages": messages,
                "temperature": request.temperature,
                "max_tokens": request.max_tokens,
            }
            if response_format is not None:
                kwargs["response_format"] = response_format
            wants_logprobs = request.top_logprobs is not None and self._logprobs_supported
            if wants_logprobs:
                kwargs["logprobs"] = True
                kwargs["top_logprobs"] = request.top_logprobs
            schema_chars = len(json.dumps(response_format)) if response_format is not None else 0
            reserved = estimate_tokens(messages, request.max_tokens, schema_chars)
            used = reserved  # what the limiter keeps unless we learn better: a failed request may have been billed
            try:
                async with self._semaphore:
                    # Inside the semaphore, so that an admitted request is sent at once and never bunches up later.
                    self._count(limiter_wait_s=await limits.acquire(reserved), http_requests=1)
                    result = await self._client.chat.completions.create(**kwargs)
                completion = self._read_completion(result)
                used = completion.usage.prompt_tokens + completion.usage.completion_tokens or reserved
                return completion
            except openai.APIStatusError as exc:
                status = exc.status_code
                detail = _scrub(_status_detail(exc), self._secret)
                if status < 500:
                    used = 0  # refused before any generation
                # Judge by what this request sent, not the shared flag: a concurrent refusal may have flipped it.
                sent_structured = response_format is not None
                if status == 400 and sent_structured and any(h in detail.lower() for h in _STRUCTURED_HINTS):
                    # The server does not do (this) structured output: spell the schema out and parse tolerantly.
                    log.warning("service LLM refused response_format (%s); falling back to prompted JSON", detail)
                    self._structured = False
                    continue
                if status == 400 and wants_logprobs and "logprob" in detail.lower():
                    # Logprobs are an optional extra: a server without them still judges, unweighted.
                    log.warning("service LLM refused logprobs (%s); asking without them", detail)
                    self._logprobs_supported = False
                    continue
                if status not in _RETRYABLE_STATUS and status < 500:
                    raise self._refusal(status, detail) from None
                hint = retry_after_seconds(exc.response.headers)
                if status == 429:
                    self._count(rate_limited=1)
                if status in _PAUSE_STATUS and hint is not None:
                    limits.pause(min(hint, self.llm.max_retry_after_s))
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
            finally:
                limits.settle(reserved, used)
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
            self._count(retries=1)
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

    def _read_completion(self, result: object) -> _Completion:
        if not isinstance(result, ChatCompletion):
            raise _MalformedResponse("the response body is not a chat completion")
        if not result.choices:
            raise _MalformedResponse("the chat completion has no choices")
        choice = result.choices[0]
        message = choice.message
        # A refusal or an empty message is a reply that does not parse: the re-ask loop handles it.
        text = message.content if message.content is not None else (getattr(message, "refusal", None) or "")
        usage = Usage()
        if result.usage is not None:
            usage = Usage(int(result.usage.prompt_tokens or 0), int(result.usage.completion_tokens or 0))
        logprobs: list[TokenLogprob] | None = None
        if choice.logprobs is not None and choice.logprobs.content:
            logprobs = [
                TokenLogprob(
                    token=item.token,
                    logprob=float(item.logprob),
                    top=tuple((alt.token, float(alt.logprob)) for alt in item.top_logprobs or ()),
                )
                for item in choice.logprobs.content
            ]
        return _Completion(text=cast(str, text), usage=usage, cached=False, logprobs=logprobs)


@dataclass(frozen=True)
class _Request:
    """The parts of a logical request that stay the same across its re-asks."""

    schema: Mapping[str, Any]
    schema_name: str
    temperature: float
    max_tokens: int
    scope: str
    nonce: int
    top_logprobs: int | None


def _logprobs_to_json(logprobs: list[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    if logprobs is None:
        return None
    return [{"token": t.token, "logprob": t.logprob, "top": [list(alt) for alt in t.top]} for t in logprobs]


def _logprobs_from_json(data: Any) -> list[TokenLogprob] | None:
    if data is None:
        return None
    return [
        TokenLogprob(
            token=str(item["token"]),
            logprob=float(item["logprob"]),
            top=tuple((str(token), float(logprob)) for token, logprob in item.get("top") or ()),
        )
        for item in data
    ]


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
