"""The generation engine behind `llamaduo serve`: one base model, any number of PEFT adapters, continuous batching.

Requests are checked and their JSON-schema grammars compiled on a small "prepare" thread pool, then handed through a
thread-safe queue to one scheduler thread that owns a `ContinuousBatcher`: between decoding steps it moves new
requests into the running batch, so requests for different adapters, temperatures, token budgets and stop strings
share every forward pass, and a finished row leaves the batch at once. Results travel back to the requests' event
loops with `call_soon_threadsafe`. Models whose cache cannot be merged (see `supports_continuous_batching`) are served
one request at a time with `generate` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jsonschema
import torch

from llamaduo_inferencer.batching import ContinuousBatcher, RowRequest, supports_continuous_batching
from llamaduo_inferencer.generation import (
    Completion,
    FinishReason,
    encode_chats,
    eos_token_ids,
    generate_batch,
    seeded,
)
from llamaduo_inferencer.serve.constrained import (
    JSON_OBJECT_SCHEMA,
    CompiledGrammar,
    GrammarCache,
    JsonConstraintProcessor,
    SchemaError,
    normalize_schema,
    unenforced_keywords,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BATCH_SIZE = 16
# Sampled rows of one request draw from generators seeded `seed + row * step` (mod 2**64).
_ROW_SEED_STEP = 0x9E3779B97F4A7C15


class UnknownModelError(LookupError):
    """The request names a model this server does not serve."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        """Remember the unknown `name` and the served ones."""
        super().__init__(f"The model `{name}` does not exist; served models: {', '.join(known)}")
        self.name = name


class InvalidRequestError(ValueError):
    """The request is well-formed but cannot be served (too long, bad schema...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        """Describe the problem and the request field it concerns."""
        super().__init__(message)
        self.param = param


class OutputValidationError(RuntimeError):
    """A constrained output failed validation against its schema (a keyword decoding cannot enforce)."""


class GenerationError(RuntimeError):
    """Generating failed on the server (out of memory, a model error); the request may be retried."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down or has shut down: the request was not (fully) served."""


@dataclass(frozen=True)
class ChatRequest:
    """What the engine needs from a chat-completion request, already validated."""

    messages: list[dict[str, str]]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request: its prompt tokens, token budget and compiled grammar (for JSON output)."""

    model_name: str
    request: ChatRequest
    prompt: list[int]
    max_tokens: int
    grammar: CompiledGrammar | None


@dataclass(frozen=True)
class StreamDelta:
    """New text for one choice; `finish_reason` is set on the last delta of that choice."""

    index: int
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class StreamEnd:
    """The end of a stream, with the completions as they would have been returned without streaming."""

    completions: list[Completion]


@dataclass
class _IncrementalText:
    """Turns a growing token list into text deltas that never need to be taken back."""

    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]
    stop: tuple[str, ...]
    sent: str = ""
    finished: bool = False
    _hold: int = field(init=False)

    def __post_init__(self) -> None:
        # A stop string might be starting at the end of the text: keep back what could still become one.
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def update(self, tokens: Sequence[int]) -> str:
        """Return the text to send for `tokens` (all tokens generated so far for this row)."""
        if self.finished:
            return ""
        cut = len(tokens)
        for position, token in enumerate(tokens):
            if token in self.eos_ids:
                cut = position
                self.finished = True
                break
        text = str(
            self.tokenizer.decode(list(tokens[:cut]), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        hits = [index for s in self.stop if (index := text.find(s)) >= 0]
        if hits:
            text = text[: min(hits)]
            self.finished = True
        elif not self.finished:
            visible = len(text) - self._hold
            # A trailing U+FFFD is an incomplete multi-byte character that the next token completes.
            while visible > 0 and text[visible - 1] == "\ufffd":
                visible -= 1
            text = text[: max(visible, 0)]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the continuous-batching scheduler's counters."""

    forward_passes: int
    running_rows: int
    waiting_rows: int
    peak_rows: int
    failed_steps: int


# What a request's event loop receives: text deltas, the end with every completion, or the error that ended it.
Event = StreamDelta | StreamEnd | BaseException


@dataclass(eq=False)
class _Job:
    """One chat request inside the scheduler: its rows and where its results go.

    `sink` runs on the request's event loop (through `post`), as does everything that sets `settled`. `cancelled` is
    set on the event loop and read by the scheduler thread; the rest belongs to the scheduler thread.
    """

    prepared: PreparedRequest
    loop: asyncio.AbstractEventLoop
    sink: Callable[[Event], None]
    trackers: list[_IncrementalText] | None
    requests: list[RowRequest] = field(default_factory=list)
    completions: list[Completion | None] = field(default_factory=list)
    pending: set[int] = field(default_factory=set)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    settled: bool = False

    def post(self, callback: Callable[..., object], *args: Any) -> None:
        """Run `callback(*args)` on the job's event loop; dropped once that loop is closed (nobody waits any more)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def on_tokens(self, row: int, tokens: list[int]) -> bool:
        """Stream the row's new text (if streaming); return True to cancel the row once the client has gone."""
        if self.cancelled:
            return True
        if self.trackers is not None:
            delta = self.trackers[row].update(tokens)
            if delta:
                for index in _choice_indexes(row, self.prepared.request):
                    self.post(self.sink, StreamDelta(index, delta))
        return False


def _choice_indexes(row: int, request: ChatRequest) -> range:
    # Greedy decoding generates one row and repeats it for every choice.
    return range(request.n) if request.temperature <= 0 else range(row, row + 1)


def _deliver_error(job: _Job, error: BaseException) -> None:
    """Hand `error` to the job's consumer (runs on its event loop)."""
    if job.settled or job.cancelled:
        return
    job.settled = True
    job.sink(error)


def _row_seed(seed: int | None, row: int) -> int | None:
    """Return the seed of a request's sampled row: every row draws from its own generator, row 0 from `seed`."""
    return None if seed is None else (seed + row * _ROW_SEED_STEP) % (1 << 64)


class _RowConstraint:
    """Adapts `JsonConstraintProcessor`, a `generate` logits processor, to the batcher's per-row processor call.

    The batcher calls `processor(tokens generated so far [1, k], scores [1, vocab])` for k = 0, 1, 2... The grammar
    processor takes the width of the first ids it sees as the prompt length and the last id of each later call as the
    token just chosen, so it must see the empty k = 0 call first and then exactly one more token per call: tokens
    then count against `max_tokens` as they do in `generate`. Anything else would silently desynchronise the
    automaton, so it is an error.
    """

    def __init__(self, grammar: CompiledGrammar, max_tokens: int) -> None:
        """Constrain one row of at most `max_tokens` tokens to `grammar`."""
        self._processor = JsonConstraintProcessor(grammar, max_tokens)
        self._expected = 0

    def __call__(self, generated: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Mask `scores` ([1, vocab]) to the tokens that keep the row on its way to a valid document."""
        if generated.shape != (1, self._expected):
            raise RuntimeError(
                f"JSON constraint out of step: expected 1 row of {self._expected} tokens, got {tuple(generated.shape)}"
            )
        self._expected += 1
        masked = self._processor(cast("torch.LongTensor", generated), cast("torch.FloatTensor", scores))
        return cast("torch.Tensor", masked)


class _Signal(enum.Enum):
    PURGE = "purge"  # a job was abandoned: drop its rows that still wait for a slot
    SHUTDOWN = "shutdown"


class _Scheduler:
    """The thread that owns a `ContinuousBatcher`: it takes new jobs between steps, steps while busy, sleeps idle.

    Jobs arrive through a thread-safe queue (`submit`); the scheduler adds their rows to the batcher, and each row's
    callbacks stream text and collect completions. A job's result goes back with `settle(job, completions)`, run on
    the job's event loop. A step that raises (out of memory, a model error) fails the jobs whose rows were in the
    batch; rows still waiting for a slot stay queued and the scheduler goes on.
    """

    def __init__(self, batcher: ContinuousBatcher, settle: Callable[[_Job, list[Completion]], None]) -> None:
        """Start the scheduler thread over `batcher`."""
        self.batcher = batcher
        self._settle = settle
        self._inbox: queue.SimpleQueue[_Job | _Signal] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._active: set[_Job] = set()
        self._peak_rows = 0
        self._failed_steps = 0
        self._thread = threading.Thread(target=self._run, name="llamaduo-scheduler", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether the scheduler takes no more jobs."""
        return self._closed

    def submit(self, job: _Job) -> None:
        """Queue a job for the scheduler thread; raise EngineClosedError once closed."""
        # Under the lock, so that no job can land in the queue behind the shutdown signal and wait forever.
        with self._lock:
            if self._closed:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            self._inbox.put(job)

    def abandon(self, job: _Job) -> None:
        """Cancel a job whose consumer has gone (runs on the job's event loop); its rows leave the batch."""
        if job.settled or job.cancelled:
            return
        job.cancelled = True
        self._inbox.put(_Signal.PURGE)

    def stats(self) -> SchedulerStats:
        """Return the current counters (read from another thread: a consistent-enough snapshot)."""
        return SchedulerStats(
            forward_passes=self.batcher.forward_passes,
            running_rows=len(self.batcher.rows),
            waiting_rows=len(self.batcher.queue),
            peak_rows=self._peak_rows,
            failed_steps=self._failed_steps,
        )

    def close(self) -> None:
        """Fail every queued and running job with EngineClosedError and stop the thread (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(_Signal.SHUTDOWN)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the scheduler thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as error:  # a bug here would hang every request: fail them loudly instead
            logger.critical("the generation scheduler stopped", exc_info=error)
            with self._lock:
                self._closed = True
            self._fail_everything(f"the generation scheduler stopped: {error}")

    def _serve(self) -> None:
        while True:
            # Idle: sleep until a request arrives. Busy: only take what has arrived since the last step.
            item = self._inbox.get() if not self.batcher.busy else self._next()
            purge = False
            while item is not None:
                if item is _Signal.SHUTDOWN:
                    self._fail_everything("the server is shutting down: the request was not completed")
                    return
                if item is _Signal.PURGE:
                    purge = True
                else:
                    self._accept(item)
                item = self._next()
            if purge:
                self._purge()
            if self.batcher.busy:
                self._step()

    def _next(self) -> _Job | _Signal | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _accept(self, job: _Job) -> None:
        if job.cancelled:
            return
        job.completions = [None] * len(job.requests)
        job.pending = set(range(len(job.requests)))
        for row, request in enumerate(job.requests):
            request.on_tokens = _bind_tokens(job, row)
            request.on_done = self._bind_done(job, row)
            try:
                self.batcher.add(request)
            except ValueError as error:  # prepare() checks the prompt and budget; kept as a last guard
                self._fail(job, InvalidRequestError(str(error)))
                return
        self._active.add(job)

    def _bind_done(self, job: _Job, row: int) -> Callable[[Completion], None]:
        def done(completion: Completion) -> None:
            job.completions[row] = completion
            job.pending.discard(row)
            if not job.pending:
                self._active.discard(job)
                if not job.cancelled:
                    job.post(self._settle, job, [c for c in job.completions if c is not None])

        return done

    def _step(self) -> None:
        try:
            self.batcher.step()
        except Exception as error:
            self._recover(error)
        else:
            self._peak_rows = max(self._peak_rows, len(self.batcher.rows))

    def _recover(self, error: Exception) -> None:
        """Fail the jobs whose rows were in the failed step; keep the rows that were waiting for a slot."""
        self._failed_steps += 1
        waiting = {id(request) for request in self.batcher.queue}
        failed = {job for job in self._active if any(id(job.requests[row]) not in waiting for row in job.pending)}
        lost = {id(request) for job in failed for request in job.requests}
        kept = [request for request in self.batcher.queue if id(request) not in lost]
        self.batcher.cancel_all()
        for request in kept:
            self.batcher.add(request)
        logger.error(
            "a generation step failed; failing %d requests, %d waiting rows kept",
            len(failed),
            len(kept),
            exc_info=error,
        )
        for job in failed:
            self._fail(job, GenerationError(f"generation failed on the server: {type(error).__name__}: {error}"))

    def _purge(self) -> None:
        """Take abandoned jobs' waiting rows out of the queue; their running rows end at their next token."""
        abandoned = [job for job in self._active if job.cancelled]
        if not abandoned:
            return
        drop = {id(request) for job in abandoned for request in job.requests}
        if any(id(request) in drop for request in self.batcher.queue):
            kept = [request for request in self.batcher.queue if id(request) not in drop]
            self.batcher.queue.clear()
            self.batcher.queue.extend(kept)
        running = {id(row.request) for row in self.batcher.rows}
        for job in abandoned:
            job.pending = {row for row in job.pending if id(job.requests[row]) in running}
            if not job.pending:
                self._active.discard(job)

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._active.discard(job)
        job.post(_deliver_error, job, error)

    def _fail_everything(self, message: str) -> None:
        jobs = list(self._active)
        while (item := self._next()) is not None:
            if isinstance(item, _Job) and not item.cancelled:
                jobs.append(item)
        self.batcher.cancel_all()
        for job in jobs:
            self._fail(job, EngineClosedError(message))
        if jobs:
            logger.warning("failed %d unfinished requests: %s", len(jobs), message)


def _bind_tokens(job: _Job, row: int) -> Callable[[list[int]], bool]:
    def on_tokens(tokens: list[int]) -> bool:
        return job.on_tokens(row, tokens)

    return on_tokens


class ChatEngine:
    """Serves chat completions from a base model and its named PEFT adapters.

    With continuous batching (the default, for models that support it), one scheduler thread runs every request's
    rows in a shared batch: up to `max_batch_size` rows decode together, mixing adapters (peft's mixed-adapter
    batches), sampling settings and token budgets, and rows join and leave between steps. Otherwise requests are
    served one `generate` call at a time on a worker thread. Either way the event loop is never blocked; checking a
    request and compiling its JSON schema run on their own threads, so a slow compile does not stall generation.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        base_name: str,
        adapter_names: Sequence[str] = (),
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        continuous_batching: bool = True,
    ) -> None:
        """Serve `model` as `base_name`; `adapter_names` must already be loaded into it (a `PeftModel`).

        `max_batch_size` bounds the rows decoded together; `continuous_batching=False` (or a model whose cache cannot
        be merged) serves one request at a time.
        """
        if adapter_names and not hasattr(model, "set_adapter"):
            raise ValueError("adapters need a PeftModel with those adapters loaded")
        if base_name in adapter_names:
            raise ValueError(f"adapter name {base_name!r} is the base model's name")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapter_names = tuple(adapter_names)
        self.default_max_tokens = default_max_tokens
        self.max_batch_size = max_batch_size
        self.grammars = GrammarCache(tokenizer)
        self.created = int(time.time())
        self._eos_ids = frozenset(eos_token_ids(model, tokenizer))
        self._context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._closed = False
        # Two threads: a request with a cached schema (or none) is not held up by another's compile.
        self._prepare_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamaduo-prepare")
        self._executor: ThreadPoolExecutor | None = None
        self._scheduler: _Scheduler | None = None
        if continuous_batching and supports_continuous_batching(model):
            batcher = ContinuousBatcher(
                model, tokenizer, max_batch_size=max_batch_size, mixed_adapters=bool(self.adapter_names)
            )
            self._scheduler = _Scheduler(batcher, self._settle)
            logger.info("continuous batching: up to %d rows per step", max_batch_size)
        else:
            if continuous_batching:
                logger.warning("this model's cache cannot be batched continuously: serving one request at a time")
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaduo-generate")

    @classmethod
    def load(
        cls,
        model: str,
        *,
        adapters: Mapping[str, Path],
        model_cache: Path,
        served_name: str | None = None,
        device: str = "auto",
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        continuous_batching: bool = True,
    ) -> ChatEngine:
        """Resolve and load the base model (converting a bundled one once), then load each adapter under its name."""
        from llamaduo.localmodel import load_causal_lm, load_tokenizer, resolve_base_model

        started = time.perf_counter()
        path = resolve_base_model(model, model_cache)
        tokenizer = load_tokenizer(path)
        base = load_causal_lm(path, device)
        loaded: PreTrainedModel = base
        if adapters:
            from peft import PeftModel

            items = list(adapters.items())
            for name, adapter_dir in items:
                if not (Path(adapter_dir) / "adapter_config.json").is_file():
                    raise FileNotFoundError(f"adapter {name!r}: {adapter_dir} has no adapter_config.json")
            first_name, first_dir = items[0]
            peft_model = PeftModel.from_pretrained(base, str(first_dir), adapter_name=first_name)
            for name, adapter_dir in items[1:]:
                peft_model.load_adapter(str(adapter_dir), adapter_name=name)
            peft_model.eval()
            # PeftModel forwards every attribute to the wrapped model; the engine uses it as one.
            loaded = cast("PreTrainedModel", peft_model)
        logger.info("loaded %s (%d adapters) in %.1f s", model, len(adapters), time.perf_counter() - started)
        return cls(
            loaded,
            tokenizer,
            base_name=served_name or model,
            adapter_names=list(adapters),
            max_batch_size=max_batch_size,
            continuous_batching=continuous_batching,
        )

    @property
    def batching(self) -> bool:
        """Whether requests are served with continuous batching (else one at a time)."""
        return self._scheduler is not None

    def stats(self) -> SchedulerStats | None:
        """Return the continuous-batching counters, or None when serving one request at a time."""
        return self._scheduler.stats() if self._scheduler is not None else None

    def model_names(self) -> list[str]:
        """Return the names requests may use: the base model first, then the adapters."""
        return [self.base_name, *self.adapter_names]

    def check_model(self, name: str) -> None:
        """Raise UnknownModelError unless `name` is served."""
        if name not in self.model_names():
            raise UnknownModelError(name, self.model_names())

    def close(self) -> None:
        """Stop serving (idempotent).

        With continuous batching, every request not yet finished fails with EngineClosedError and the scheduler
        thread stops; one at a time, the worker first finishes the queued requests.
        """
        self._closed = True
        if self._scheduler is not None:
            self._scheduler.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._prepare_executor.shutdown(wait=True)

    async def prepare(self, model_name: str, request: ChatRequest) -> PreparedRequest:
        """Check the request against the model (known name, context, schema) and compile its grammar if any.

        Runs on a prepare thread, since compiling a new schema can take seconds; raises UnknownModelError or
        InvalidRequestError before anything is generated, EngineClosedError once the engine is closed.
        """
        self.check_model(model_name)
        if self._closed:
            raise EngineClosedError("the server is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_executor, self._prepare, model_name, request)

    async def complete(self, prepared: PreparedRequest) -> list[Completion]:
        """Generate the request's `n` completions; cancelling the call cancels the generation."""
        loop = asyncio.get_running_loop()
        if self._scheduler is None:
            return await loop.run_in_executor(self._one_at_a_time(), self._generate, prepared, None)
        future: asyncio.Future[list[Completion]] = loop.create_future()

        def sink(item: Event) -> None:
            if future.done():
                return
            if isinstance(item, BaseException):
                future.set_exception(item)
            elif isinstance(item, StreamEnd):
                future.set_result(item.completions)

        job = self._submit(self._scheduler, prepared, sink, streaming=False)
        try:
            return await future
        finally:
            self._scheduler.abandon(job)

    async def chat(self, model_name: str, request: ChatRequest) -> list[Completion]:
        """Prepare and complete a request in one call."""
        return await self.complete(await self.prepare(model_name, request))

    async def stream(self, prepared: PreparedRequest) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        """Yield text deltas as they are generated, then a StreamEnd; leaving early stops the generation."""
        if self._scheduler is None:
            async for step in self._stream_one_at_a_time(prepared):
                yield step
            return
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = self._submit(self._scheduler, prepared, events.put_nowait, streaming=True)
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, StreamEnd):
                    return
        finally:
            self._scheduler.abandon(job)

    # -- continuous batching ----------------------------------------------------------------------------------------

    def _submit(
        self, scheduler: _Scheduler, prepared: PreparedRequest, sink: Callable[[Event], None], *, streaming: bool
    ) -> _Job:
        """Turn a prepared request into its rows (n samples, or one greedy row) and queue it for the scheduler."""
        request = prepared.request
        rows = request.n if request.temperature > 0 else 1
        # A stop string would cut a constrained document short of valid JSON.
        stop = () if prepared.grammar is not None else request.stop
        trackers = [_IncrementalText(self.tokenizer, self._eos_ids, stop) for _ in range(rows)] if streaming else None
        job = _Job(prepared, asyncio.get_running_loop(), sink, trackers)
        adapter = None if prepared.model_name == self.base_name else prepared.model_name
        for row in range(rows):
            job.requests.append(
                RowRequest(
                    prompt=prepared.prompt,
                    max_new_tokens=prepared.max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    stop=stop,
                    seed=_row_seed(request.seed, row),
                    adapter=adapter,
                    processor=_RowConstraint(prepared.grammar, prepared.max_tokens) if prepared.grammar else None,
                )
            )
        scheduler.submit(job)
        return job

    def _settle(self, job: _Job, completions: list[Completion]) -> None:
        """Deliver a finished job's result (runs on its event loop): validate JSON, send the streams' last deltas."""
        if job.settled or job.cancelled:
            return
        job.settled = True
        request = job.prepared.request
        if len(completions) < request.n:  # greedy: one row answers every choice
            completions = completions * request.n
        if request.json_schema is not None:
            try:
                self._validate(request.json_schema, completions)
            except OutputValidationError as error:
                job.sink(error)
                return
        if job.trackers is not None:
            for index, completion in enumerate(completions):
                sent = job.trackers[index if len(job.trackers) > 1 else 0].sent
                rest = completion.text[len(sent) :] if completion.text.startswith(sent) else ""
                job.sink(StreamDelta(index, rest, finish_reason=completion.finish_reason))
        job.sink(StreamEnd(completions))
        self._log_done(job.prepared, completions, job.submitted, len(job.requests))

    # -- one request at a time --------------------------------------------------------------------------------------

    def _one_at_a_time(self) -> ThreadPoolExecutor:
        if self._executor is None or self._closed:
            raise EngineClosedError("the server is shutting down and takes no new requests")
        return self._executor

    async def _stream_one_at_a_time(self, prepared: PreparedRequest) -> AsyncGenerator[StreamDelta | StreamEnd, None]:
        request = prepared.request
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamDelta | StreamEnd | BaseException] = asyncio.Queue()
        cancelled = False
        rows = request.n if request.temperature > 0 else 1
        stop = () if prepared.grammar is not None else request.stop
        trackers = [_IncrementalText(self.tokenizer, self._eos_ids, stop) for _ in range(rows)]

        def on_step(generated: torch.Tensor) -> bool:
            for row, tokens in enumerate(generated.tolist()):
                delta = trackers[row].update(tokens)
                if delta:
                    for index in _choice_indexes(row, request):
                        loop.call_soon_threadsafe(queue.put_nowait, StreamDelta(index, delta))
            return cancelled

        def work() -> None:
            try:
                completions = self._generate(prepared, on_step)
            except BaseException as error:  # handed to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, error)
                return
            for index, completion in enumerate(completions):
                sent = trackers[index if rows > 1 else 0].sent
                rest = completion.text[len(sent) :] if completion.text.startswith(sent) else ""
                loop.call_soon_threadsafe(
                    queue.put_nowait, StreamDelta(index, rest, finish_reason=completion.finish_reason)
                )
            loop.call_soon_threadsafe(queue.put_nowait, StreamEnd(completions))

        future = loop.run_in_executor(self._one_at_a_time(), work)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, StreamEnd):
                    break
        finally:
            cancelled = True
            await future

    @contextlib.contextmanager
    def _selected(self, model_name: str) -> Iterator[None]:
        peft_model = cast("PeftModel", self.model)
        if model_name == self.base_name:
            if self.adapter_names:
                with peft_model.disable_adapter():
                    yield
            else:
                yield
        else:
            peft_model.set_adapter(model_name)
            yield

    def _generate(
        self, prepared: PreparedRequest, on_step: Callable[[torch.Tensor], bool | None] | None
    ) -> list[Completion]:
        started = time.perf_counter()
        request = prepared.request
        processors = [JsonConstraintProcessor(prepared.grammar, prepared.max_tokens)] if prepared.grammar else []
        with self._selected(prepared.model_name), seeded(request.seed, self.model.device):
            completions = generate_batch(
                self.model,
                self.tokenizer,
                [prepared.prompt],
                n=request.n,
                temperature=request.temperature,
                top_p=request.top_p,
                max_new_tokens=prepared.max_tokens,
                # A stop string would cut a constrained document short of valid JSON.
                stop=() if prepared.grammar is not None else request.stop,
                logits_processors=processors,
                on_step=on_step,
            )[0]
        if request.json_schema is not None:
            self._validate(request.json_schema, completions)
        self._log_done(prepared, completions, started, request.n if request.temperature > 0 else 1)
        return completions

    # -- shared -----------------------------------------------------------------------------------------------------

    def _prepare(self, model_name: str, request: ChatRequest) -> PreparedRequest:
        prompt = encode_chats(self.tokenizer, [request.messages])[0]
        if self._context and len(prompt) >= self._context:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is {self._context}", "messages"
            )
        room = self._context - len(prompt) if self._context else None
        grammar = None
        if request.json_schema is not None:
            try:
                grammar = self.grammars.get(request.json_schema)
            except SchemaError as error:
                raise InvalidRequestError(str(error), "response_format") from error
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max(self.default_max_tokens, grammar.min_tokens if grammar else 0)
            max_tokens = min(max_tokens, room) if room is not None else max_tokens
        elif room is not None and max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} plus the prompt's {len(prompt)} tokens exceed this model's context "
                f"of {self._context}",
                "max_tokens",
            )
        if grammar is not None and max_tokens < grammar.min_tokens:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} is too small for this JSON schema: constrained decoding needs at "
                f"least {grammar.min_tokens}",
                "max_tokens",
            )
        return PreparedRequest(model_name, request, prompt, max_tokens, grammar)

    @staticmethod
    def _log_done(prepared: PreparedRequest, completions: Sequence[Completion], started: float, rows: int) -> None:
        generated = sum(completion.completion_tokens for completion in completions[:rows])
        logger.info(
            "%s: %d prompt + %d completion tokens in %.2f s",
            prepared.model_name,
            len(prepared.prompt),
            generated,
            time.perf_counter() - started,
        )

    @staticmethod
    def _validate(schema: dict[str, Any], completions: Sequence[Completion]) -> None:
        for index, completion in enumerate(completions):
            try:
                jsonschema.validate(json.loads(completion.text), schema)
            except (json.JSONDecodeError, jsonschema.ValidationError) as error:
                unenforced = ", ".join(sorted(unenforced_keywords(normalize_schema(schema)))) or "none"
                raise OutputValidationError(
                    f"choice {index} does not validate against the schema ({error}); keywords that constrained "
                    f"decoding cannot enforce: {unenforced}"
                ) from error


def json_schema_of(response_format: Any) -> dict[str, Any] | None:
    """Return the schema a `response_format` asks for (`{"type": "object"}` for json_object), or None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return dict(JSON_OBJECT_SCHEMA)
    if response_format.json_schema is None:
        raise InvalidRequestError("response_format json_schema needs a `json_schema` member", "response_format")
    return dict(response_format.json_schema.json_schema) or dict(JSON_OBJECT_SCHEMA)
