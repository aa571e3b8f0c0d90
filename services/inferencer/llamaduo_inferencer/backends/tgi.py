"""Answers from a Hugging Face Text Generation Inference server, through `huggingface_hub.AsyncInferenceClient`.

The conversation is rendered to prompt text here, with the chat template the trainer used (the caller's `render`),
and sent to TGI's native generate API with `details=True`, so the server reports generated tokens and finish
reasons. The fine-tuned adapter is chosen per request with `adapter_id`; TGI must have it preloaded
(`LORA_ADAPTERS=<id>` / `--lora-adapters`).

Two behaviours of the client library are worked around (huggingface_hub 2.4):

- Its HTTP session refuses every request, to any host, when `HF_HUB_OFFLINE=1` (read once, at import), and our
  services set that variable so that no model load reaches the Hub. This backend gives the client its own
  `httpx2.AsyncClient`, which talks only to the configured TGI server.
- Without an `api_key` it sends the ambient Hugging Face token (`HF_TOKEN` or the saved login) to the server as a
  bearer token. This backend strips the Authorization header unless an `api_key` was configured.

Beware: real TGI answers a request whose `adapter_id` it did not load with the base model, without an error
(huggingface/text-generation-inference#2505); only a server that refuses such a request yields
`tgi:unknown_adapter`. Start TGI with exactly the adapters you mean to evaluate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient, TextGenerationOutput
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, TextGenerationError

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

Render = Callable[[Sequence[Message]], tuple[str, int]]
"""Turns a conversation into (prompt text with the generation prompt appended, its prompt token count)."""


class _DirectInferenceClient(AsyncInferenceClient):
    """An `AsyncInferenceClient` whose HTTP client talks only to our server (see the module docstring)."""

    def __init__(self, *, base_url: str, timeout: float, api_key: str | None) -> None:
        super().__init__(base_url=base_url, timeout=timeout, api_key=api_key)
        self._send_auth = api_key is not None

    async def _get_async_client(self) -> httpx2.AsyncClient:
        # Overrides the library's session factory, whose request hook raises OfflineModeIsEnabled for any URL.
        if self._async_client is None:
            hooks: dict[str, list[Callable[[Any], Any]]] = {"request": [] if self._send_auth else [_drop_auth]}
            client = httpx2.AsyncClient(event_hooks=hooks, follow_redirects=False, timeout=self.timeout)
            self._async_client = await self.exit_stack.enter_async_context(client)
        return self._async_client


async def _drop_auth(request: httpx2.Request) -> None:
    request.headers.pop("authorization", None)


class TGIBackend:
    """A `RemoteBackend` on a TGI server's native generate API, with bounded concurrency, retries and clear errors.

    Each of the `n` completions is its own request (seeds `seed`, `seed + 1`, ... when a seed is given); greedy
    sampling (temperature 0) sends one request with `do_sample=False` and repeats its answer `n` times. At most
    `concurrency` requests are in flight, across all calls. Connection errors, timeouts, 408, 429 and 5xx are
    retried `max_retries` times with exponential backoff and jitter (honouring Retry-After); other 4xx fail at once.
    """

    def __init__(
        self,
        endpoint: str,
        render: Render,
        *,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        api_key: str | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        max_retry_after_s: float = 60.0,
    ) -> None:
        """Talk to the TGI server at `endpoint` (its base URL, e.g. http://tgi:8080); `render` makes the prompt."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self._render = render
        self._api_key = api_key or None
        self._semaphore = asyncio.Semaphore(concurrency)
        self._retry = RetryPolicy(max_retries, backoff_base_s, backoff_max_s, max_retry_after_s)
        self._client = _DirectInferenceClient(base_url=self.endpoint, timeout=timeout_s, api_key=self._api_key)
        self._warned_no_details = False

    async def answer(
        self, conversation: Sequence[Message], sampling: Sampling, adapter: str | None
    ) -> list[Completion]:
        """Return `sampling.n` completions for `conversation` from `adapter` (None: the base model)."""
        if sampling.n <= 0:
            return []
        prompt, prompt_tokens = self._render(conversation)
        if sampling.temperature <= 0:
            one = await self._generate(prompt, prompt_tokens, sampling, adapter, seed=None)
            return [one] * sampling.n
        seeds = [None if sampling.seed is None else sampling.seed + j for j in range(sampling.n)]
        return await gather_or_cancel(
            [self._generate(prompt, prompt_tokens, sampling, adapter, seed=seed) for seed in seeds]
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()  # type: ignore[no-untyped-call]  # untyped in huggingface_hub

    async def _generate(
        self, prompt: str, prompt_tokens: int, sampling: Sampling, adapter: str | None, *, seed: int | None
    ) -> Completion:
        """One completion, retried while the failure is transient."""
        attempt = 0
        while True:
            try:
                async with self._semaphore:
                    started = time.perf_counter()
                    # The client's timeout bounds each phase of the exchange; this one bounds the whole request.
                    async with asyncio.timeout(self.timeout_s):
                        output = await self._request(prompt, sampling, adapter, seed)
                    latency = time.perf_counter() - started
                return self._completion(output, prompt_tokens, sampling, latency)
            except BackendError:
                raise
            except Exception as exc:
                failure = self._classify(exc, adapter)
            if attempt >= self._retry.max_retries:
                raise BackendError(
                    "tgi:unreachable",
                    f"TGI at {self.endpoint} failed {attempt + 1} attempt(s); last error: {failure.problem}",
                )
            delay = self._retry.delay(attempt, failure.retry_after_s)
            log.warning(
                "TGI attempt %d/%d at %s failed (%s); retrying in %.2f s",
                attempt + 1,
                self._retry.max_retries + 1,
                self.endpoint,
                failure.problem,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1

    async def _request(self, prompt: str, sampling: Sampling, adapter: str | None, seed: int | None) -> object:
        greedy = sampling.temperature <= 0
        # TGI refuses temperature 0 and top_p outside (0, 1): greedy sends neither, and top_p 1 means "off".
        top_p = sampling.top_p if not greedy and 0.0 < sampling.top_p < 1.0 else None
        return await self._client.text_generation(
            prompt,
            details=True,
            adapter_id=adapter,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=top_p,
            seed=None if greedy else seed,
            stop=list(sampling.stop) or None,
        )

    def _completion(self, output: object, prompt_tokens: int, sampling: Sampling, latency: float) -> Completion:
        if isinstance(output, TextGenerationOutput):
            text, details = output.generated_text, output.details
        elif isinstance(output, str):  # a server that ignores `details`
            text, details = output, None
        else:
            raise BackendError("tgi:bad_response", f"TGI at {self.endpoint} returned {type(output).__name__}")
        finish: FinishReason = "stop"
        completion_tokens = 0
        if details is None:
            if not self._warned_no_details:
                self._warned_no_details = True
                log.warning("TGI at %s returned no generation details; token counts are reported as 0", self.endpoint)
        else:
            completion_tokens = int(details.generated_tokens)
            finish = "length" if details.finish_reason == "length" else "stop"
        return Completion(
            text=strip_stop(text, sampling.stop),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
            latency_s=latency,
        )

    def _classify(self, exc: Exception, adapter: str | None) -> Transient:
        """The transient failure `exc` stands for, or raise the `BackendError` that no retry can fix."""
        if isinstance(exc, InferenceTimeoutError | TimeoutError | httpx2.TimeoutException):
            return Transient(f"timed out after {self.timeout_s} s")
        response = _response_of(exc)
        if response is not None:
            status = response.status_code
            detail = scrub(_server_detail(response, exc), self._api_key)
            if status in RETRYABLE_STATUS or status >= 500:
                return Transient(f"HTTP {status}: {detail}", retry_after_seconds(response.headers))
            raise self._refusal(status, detail, adapter) from None
        if isinstance(exc, httpx2.TransportError):
            return Transient(scrub(f"connection error: {type(exc).__name__}: {exc}", self._api_key))
        if isinstance(exc, ValueError | TypeError | KeyError):
            # A 2xx body that is not TGI's JSON (a proxy's page, a different server): maybe a passing fault.
            return Transient(scrub(f"unreadable response: {type(exc).__name__}: {exc}", self._api_key))
        raise exc

    def _refusal(self, status: int, detail: str, adapter: str | None) -> BackendError:
        where = f"TGI at {self.endpoint} refused the request (HTTP {status}): {detail}"
        if adapter is not None and "adapter" in detail.lower():
            return BackendError(
                "tgi:unknown_adapter",
                f"{where}. TGI must be started with adapter {adapter!r} preloaded, e.g. LORA_ADAPTERS={adapter}",
            )
        if status in (400, 413, 422) and is_prompt_too_long(detail):
            return BackendError(
                "tgi:prompt_too_long",
                f"{where}. Shorten the prompt or lower max_new_tokens, or raise the server's --max-input-tokens / "
                "--max-total-tokens",
            )
        return BackendError("tgi:rejected", where)


def _response_of(exc: BaseException) -> httpx2.Response | None:
    """The HTTP response behind a huggingface_hub error (TGI errors are raised from the HfHubHTTPError)."""
    if isinstance(exc, HfHubHTTPError):
        return exc.response
    if isinstance(exc, TextGenerationError) and isinstance(exc.__cause__, HfHubHTTPError):
        return exc.__cause__.response
    return None


def _server_detail(response: httpx2.Response, exc: BaseException) -> str:
    """The server's own error text: TGI's `{"error": ...}`, else the body, else the exception's message."""
    try:
        payload = response.json()
    except Exception:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str) and error:
            return error[:500]
        message = payload.get("message")
        if isinstance(message, str) and message:
            return message[:500]
    try:
        text = response.text.strip()
    except Exception:
        text = ""
    return (text or str(exc).strip() or type(exc).__name__)[:500]
