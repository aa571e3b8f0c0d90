"""The generation engine behind `llamaduo serve`: one base model, any number of PEFT adapters, one worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jsonschema
import torch

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


class ChatEngine:
    """Serves chat completions from a base model and its named PEFT adapters.

    Requests are queued on a single worker thread and served one `generate` call at a time, so the event loop is
    never blocked and adapters can be switched safely between calls. True continuous batching (admitting new
    requests into a running batch) is future work.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        base_name: str,
        adapter_names: Sequence[str] = (),
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        """Serve `model` as `base_name`; `adapter_names` must already be loaded into it (a `PeftModel`)."""
        if adapter_names and not hasattr(model, "set_adapter"):
            raise ValueError("adapters need a PeftModel with those adapters loaded")
        if base_name in adapter_names:
            raise ValueError(f"adapter name {base_name!r} is the base model's name")
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapter_names = tuple(adapter_names)
        self.default_max_tokens = default_max_tokens
        self.grammars = GrammarCache(tokenizer)
        self.created = int(time.time())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaduo-generate")
        self._eos_ids = frozenset(eos_token_ids(model, tokenizer))
        self._context = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    @classmethod
    def load(
        cls,
        model: str,
        *,
        adapters: Mapping[str, Path],
        model_cache: Path,
        served_name: str | None = None,
        device: str = "auto",
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
        return cls(loaded, tokenizer, base_name=served_name or model, adapter_names=list(adapters))

    def model_names(self) -> list[str]:
        """Return the names requests may use: the base model first, then the adapters."""
        return [self.base_name, *self.adapter_names]

    def check_model(self, name: str) -> None:
        """Raise UnknownModelError unless `name` is served."""
        if name not in self.model_names():
            raise UnknownModelError(name, self.model_names())

    def close(self) -> None:
        """Stop the worker thread after the queued requests."""
        self._executor.shutdown(wait=True)

    async def prepare(self, model_name: str, request: ChatRequest) -> PreparedRequest:
        """Check the request against the model (known name, context, schema) and compile its grammar if any.

        Runs on the worker thread, since compiling a new schema can take seconds; raises UnknownModelError or
        InvalidRequestError before anything is generated.
        """
        self.check_model(model_name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prepare, model_name, request)

    async def complete(self, prepared: PreparedRequest) -> list[Completion]:
        """Generate the request's `n` completions on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate, prepared, None)

    async def chat(self, model_name: str, request: ChatRequest) -> list[Completion]:
        """Prepare and complete a request in one call."""
        return await self.complete(await self.prepare(model_name, request))

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[StreamDelta | StreamEnd]:
        """Yield text deltas as they are generated, then a StreamEnd; leaving early stops the generation."""
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
                    for index in self._choice_indexes(row, request):
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

        future = loop.run_in_executor(self._executor, work)
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

    @staticmethod
    def _choice_indexes(row: int, request: ChatRequest) -> range:
        # Greedy decoding generates one row and repeats it for every choice.
        return range(request.n) if request.temperature <= 0 else range(row, row + 1)

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
        generated = sum(completion.completion_tokens for completion in completions)
        logger.info(
            "%s: %d prompt + %d completion tokens in %.2f s",
            prepared.model_name,
            len(prepared.prompt),
            generated,
            time.perf_counter() - started,
        )
        return completions

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
