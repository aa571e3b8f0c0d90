"""Answers from an OpenAI-compatible chat server (vLLM, or TGI's Messages API), through `openai.AsyncOpenAI`.

The server renders the conversation with its own chat template, so it must serve the base model with the template
the trainer used. The adapter is chosen by the request's `model`: vLLM serves a LoRA adapter under the name given
by `--lora-modules name=path` (or loaded at runtime with `load_adapter`); TGI's Messages API takes `model` as the
`adapter_id` (and "tgi" for the base model).

Retries are done here rather than by the SDK (`max_retries=0`), so they behave like the TGI backend's: connection
errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and jitter, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from llamaduo.llm.client import retry_after_seconds
from llamaduo_inferencer.backends import BackendError, Sampling
from llamaduo_inferencer.backends.common import (
    RETRYABLE_STATUS,
    RetryPolicy,
    Transient,
    gather_or_cancel,
    is_prompt_too_long,
    scrub,
    strip_stop,
)
from llamaduo_inferencer.generation import Completion, FinishReason, Message

log = logging.getLogger(__name__)

UNKNOWN_MODEL_HINTS = ("does not exist", "not found", "unknown model", "no such model", "invalid model")
"""Phrases of servers' errors for a model (adapter) name they do not serve."""


def openai_base_url(endpoint: str) -> str:
    """The SDK's base URL for `endpoint`: the server's root or its `/v1` URL, both accepted, with `/v1` kept."""
    url = endpoint.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class OpenAICompatibleBackend:
    """A `RemoteBackend` on `/v1/chat/completions`, with bounded concurrency, retries and clear errors.

    `model` is the adapter's served name, or `base_model` without an adapter. Each of the `n` completions is a
    request with n=1 (TGI's Messages API does not do n>1), seeded `seed`, `seed + 1`, ... when a seed is given;
    greedy sampling (temperature 0) sends one request and repeats its answer `n` times, like the other backends.
    Token counts come from the response's `usage` (0, with a warning, from a server that sends none).
    """

    def __init__(
        self,
        endpoint: str,
        base_model: str,
        *,
        api_key: str | None = "EMPTY",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        max_retry_after_s: float = 60.0,
    ) -> None:
        """Talk to the server at `endpoint` (e.g. http://vllm:8000 or http://vllm:8000/v1) serving `base_model`."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.endpoint = openai_base_url(endpoint)
        self.base_model = base_model
        self.timeout_s = timeout_s
        self._api_key = api_key or "EMPTY"
        self._semaphore = asyncio.Semaphore(concurrency)
        self._retry = RetryPolicy(max_retries, backoff_base_s, backoff_max_s, max_retry_after_s)
        self._client = openai.AsyncOpenAI(
            api_key=self._api_key, base_url=self.endpoint, max_retries=0, timeout=timeout_s
        )
        self._warned_no_usage = False

    async def answer(
        self, conversation: Sequence[Message], sampling: Sampling, adapter: str | None
    ) -> list[Completion]:
        """Return `sampling.n` completions for `conversation` from `adapter` (None: the base model)."""
        if sampling.n <= 0:
            return []
        messages = [dict(message) for message in conversation]
        model = adapter or self.base_model
        if sampling.temperature <= 0:
            one = await self._complete(messages, model, sampling, seed=sampling.seed)
            return [one] * sampling.n
        seeds = [None if sampling.seed is None else sampling.seed + j for j in range(sampling.n)]
        return await gather_or_cancel([self._complete(messages, model, sampling, seed=seed) for seed in seeds])

    async def load_adapter(self, name: str, path: str) -> None:
        """Ask vLLM to load the LoRA adapter at `path` (a path on the server) as model `name`; loaded already is fine.

        Needs vLLM started with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`; TGI cannot load
        adapters at runtime. Raises `BackendError("openai:adapter_load_failed")` when the server refuses.
        """
        body = {"lora_name": name, "lora_path": path}
        attempt = 0
        while True:
            try:
                async with self._semaphore, asyncio.timeout(self.timeout_s):
                    await self._client.post("/load_lora_adapter", cast_to=str, body=body)
                log.info("loaded adapter %r from %s on %s", name, path, self.endpoint)
                return
            except openai.APIStatusError as exc:
                detail = scrub(_status_detail(exc), self._api_key)
                if exc.status_code == 400 and "already" in detail.lower() and "loaded" in detail.lower():
                    log.info("adapter %r was already loaded on %s", name, self.endpoint)
                    return
                if exc.status_code not in RETRYABLE_STATUS and exc.status_code < 500:
                    hint = ""
                    if exc.status_code in (404, 405):
                        hint = (
                            ". The server has no runtime adapter loading: start vLLM with --enable-lora and "
                            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (TGI must preload adapters instead)"
                        )
                    raise BackendError(
                        "openai:adapter_load_failed",
                        f"{self.endpoint}/load_lora_adapter refused to load {name!r} from {path!r} "
                        f"(HTTP {exc.status_code}): {detail}{hint}",
                    ) from None
                failure = Transient(f"HTTP {exc.status_code}: {detail}", retry_after_seconds(exc.response.headers))
            except Exception as exc:
                failure = self._transient(exc)
            if attempt >= self._retry.max_retries:
                raise BackendError(
                    "openai:adapter_load_failed",
                    f"could not load adapter {name!r} on {self.endpoint} after {attempt + 1} attempt(s); "
                    f"last error: {failure.problem}",
                )
            await self._pause(attempt, failure)
            attempt += 1

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def _complete(
        self, messages: list[dict[str, str]], model: str, sampling: Sampling, *, seed: int | None
    ) -> Completion:
        """One completion, retried while the failure is transient."""
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "n": 1,
            "temperature": max(0.0, sampling.temperature),
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        if seed is not None:
            kwargs["seed"] = seed
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        attempt = 0
        while True:
            try:
                async with self._semaphore:
                    started = time.perf_counter()
                    async with asyncio.timeout(self.timeout_s):
                        result = await self._client.chat.completions.create(**kwargs)
                    latency = time.perf_counter() - started
                return self._completion(result, sampling, latency)
            except openai.APIStatusError as exc:
                status = exc.status_code
                detail = scrub(_status_detail(exc), self._api_key)
                if status not in RETRYABLE_STATUS and status < 500:
                    raise self._refusal(status, detail, model) from None
                failure = Transient(f"HTTP {status}: {detail}", retry_after_seconds(exc.response.headers))
            except Exception as exc:
                failure = self._transient(exc)
            if attempt >= self._retry.max_retries:
                raise BackendError(
                    "openai:unreachable",
                    f"OpenAI-compatible server at {self.endpoint} failed {attempt + 1} attempt(s); "
                    f"last error: {failure.problem}",
                )
            await self._pause(attempt, failure)
            attempt += 1

    async def _pause(self, attempt: int, failure: Transient) -> None:
        delay = self._retry.delay(attempt, failure.retry_after_s)
        log.warning(
            "attempt %d/%d at %s failed (%s); retrying in %.2f s",
            attempt + 1,
            self._retry.max_retries + 1,
            self.endpoint,
            failure.problem,
            delay,
        )
        await asyncio.sleep(delay)

    def _transient(self, exc: Exception) -> Transient:
        """The transient failure a non-HTTP-status exception stands for; anything unexpected propagates."""
        if isinstance(exc, openai.APITimeoutError | TimeoutError):
            return Transient(f"timed out after {self.timeout_s} s")
        if isinstance(exc, openai.APIConnectionError):
            return Transient(scrub(f"connection error: {exc.__cause__ or exc}", self._api_key))
        if isinstance(exc, openai.APIResponseValidationError | ValueError):
            # The SDK raises the JSON decoder's error when a 2xx body is not JSON (a proxy's error page).
            return Transient(scrub(f"unreadable response: {exc}", self._api_key))
        raise exc

    def _completion(self, result: object, sampling: Sampling, latency: float) -> Completion:
        if not isinstance(result, ChatCompletion) or not result.choices:
            raise ValueError("the response is not a chat completion with a choice")
        choice = result.choices[0]
        text = choice.message.content or ""
        finish: FinishReason = "length" if choice.finish_reason == "length" else "stop"
        prompt_tokens = completion_tokens = 0
        if result.usage is not None:
            prompt_tokens = int(result.usage.prompt_tokens or 0)
            completion_tokens = int(result.usage.completion_tokens or 0)
        elif not self._warned_no_usage:
            self._warned_no_usage = True
            log.warning("%s sent no token usage; token counts are reported as 0", self.endpoint)
        return Completion(
            text=strip_stop(text, sampling.stop),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
            latency_s=latency,
        )

    def _refusal(self, status: int, detail: str, model: str) -> BackendError:
        where = f"{self.endpoint} refused the request for model {model!r} (HTTP {status}): {detail}"
        lowered = detail.lower()
        if status == 404 or (status in (400, 422) and any(hint in lowered for hint in UNKNOWN_MODEL_HINTS)):
            return BackendError(
                "openai:unknown_model",
                f"{where}. Serve the adapter under that name (vLLM: --lora-modules {model}=<path>, or load it with "
                "load_adapter), and check that the endpoint is the server's OpenAI base URL",
            )
        if status in (400, 413, 422) and is_prompt_too_long(detail):
            return BackendError(
                "openai:prompt_too_long",
                f"{where}. Shorten the prompt or lower max_new_tokens, or serve the model with a longer context",
            )
        return BackendError("openai:rejected", where)


def _status_detail(exc: openai.APIStatusError) -> str:
    """The server's error message: OpenAI's `{"error": {"message"}}`, vLLM's `{"message"}`, TGI's `{"error"}`."""
    body = exc.body  # the SDK has already unwrapped a top-level "error" (TGI's is then a plain string)
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
        if isinstance(body.get("message"), str):
            return str(body["message"])[:500]
    return str(exc.message)[:500]
