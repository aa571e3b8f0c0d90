"""Continuous batching over a transformers causal LM: rows join and leave a running batch between decoding steps.

`generate` on fixed batches keeps computing every row until the longest one finishes, and pads every prompt to the
longest in its batch. Here a row that ends (eos, stop string, token budget, cancellation) leaves the batch at once and
its slot is refilled from the queue, so the batch stays full of useful work; new rows are prefilled together (sorted
by length, so they pad little) and their KV cache is merged into the running one, left-padded to a common length.
Columns that are padding for every row are trimmed as rows leave.

Every row carries its own sampling settings (temperature, top-p, stop strings, token budget, seed, an optional logits
processor for constrained decoding and, for a PEFT model, the adapter it uses), so unrelated requests share one batch.
Rows with a seed draw from their own generator: a row's answer does not depend on which rows share its batch, up to
floating-point differences of batched matrix products.

Only models whose cache is a plain `DynamicCache` of full-attention layers can be merged and pruned this way;
`supports_continuous_batching` says whether a model qualifies (sliding-window and linear-attention caches do not).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llamaduo_inferencer.generation import (
    Completion,
    Message,
    encode_chats,
    eos_token_ids,
    finish_completion,
    generate_chats,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# (tokens generated so far for the row, its next-token scores of shape [1, vocab]) -> masked scores.
RowProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Called with all tokens generated so far after each new token; returning True cancels the row.
TokenCallback = Callable[[list[int]], bool | None]
BASE_ADAPTER = "__base__"


@dataclass
class RowRequest:
    """One sequence to generate: a tokenized prompt and how to sample its continuation."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    adapter: str | None = None
    processor: RowProcessor | None = None
    on_tokens: TokenCallback | None = None
    on_done: Callable[[Completion], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    request: RowRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    stopped_at: int | None = None
    cancelled: bool = False


MIN_TRANSFORMERS = Version("5.24.0")
"""Older transformers (5.17-5.23 checked) give wrong tokens for rows that join a running cache; they fall back."""


def supports_continuous_batching(model: PreTrainedModel) -> bool:
    """Whether the model's cache is made of plain full-attention `DynamicLayer`s that can be merged and pruned
    (and the installed transformers is one whose cache merging was checked to give `generate`'s answers)."""
    if Version(transformers.__version__) < MIN_TRANSFORMERS:
        return False
    config = getattr(model, "config", None)
    if config is None:
        return False
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config the cache cannot read: play safe
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class ContinuousBatcher:
    """Runs rows through one model with continuous batching; drive it with `step()` or run a whole list with `run()`.

    Not thread-safe: one thread owns it (serving calls `add` from the same worker thread that calls `step`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 4096,
        mixed_adapters: bool = False,
    ) -> None:
        """Batch at most `max_batch_size` rows, prefilling at most `max_prefill_tokens` padded tokens at a time.

        With `mixed_adapters` the model is a PeftModel and each forward pass names every row's adapter
        (`RowRequest.adapter`, None meaning the base model).
        """
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.mixed_adapters = mixed_adapters
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._eos = set(self.eos_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.device = model.device
        self.queue: deque[RowRequest] = deque()
        self.rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, columns], 1 for real tokens
        self._positions: torch.Tensor | None = None  # [rows], position of each row's next token
        self._last: torch.Tensor | None = None  # [rows], each row's latest token, fed to the next step
        self.forward_passes = 0

    # -- queueing ---------------------------------------------------------------------------------------------------

    def add(self, request: RowRequest) -> None:
        """Queue a row; it joins the batch at a later step."""
        if not request.prompt:
            raise ValueError("a row needs at least one prompt token")
        if request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.queue.append(request)

    @property
    def busy(self) -> bool:
        """Whether rows are running or waiting."""
        return bool(self.rows or self.queue)

    def run(self, requests: Iterable[RowRequest]) -> list[Completion]:
        """Generate every request (longest prompts first, for tight prefills) and return completions in input order."""
        ordered = list(requests)
        results: list[Completion | None] = [None] * len(ordered)
        order = sorted(range(len(ordered)), key=lambda index: len(ordered[index].prompt), reverse=True)
        for index in order:
            request = ordered[index]
            callback = request.on_done

            def done(completion: Completion, index: int = index, callback: Any = callback) -> None:
                results[index] = completion
                if callback is not None:
                    callback(completion)

            request.on_done = done
            self.add(request)
        while self.busy:
            self.step()
        return [completion for completion in results if completion is not None]

    # -- one scheduling step ----------------------------------------------------------------------------------------

    def step(self) -> None:
        """Admit waiting rows if there is room, then decode one token for every running row."""
        free = self.max_batch_size - len(self.rows)
        # Every tensor of the batch lives in inference mode (no autograd bookkeeping, in-place updates allowed).
        with torch.inference_mode():
            # Prefilling stalls every running row, so new rows are admitted in groups rather than one per step.
            if self.queue and free > 0 and (not self.rows or free >= max(1, self.max_batch_size // 4)):
                self._admit(free)
            if self.rows:
                self._decode()

    def cancel_all(self) -> None:
        """Drop every running and waiting row without completing it."""
        self.queue.clear()
        self.rows = []
        self._cache = self._mask = self._positions = self._last = None

    # -- internals --------------------------------------------------------------------------------------------------

    def _forward(self, **inputs: Any) -> torch.Tensor:
        if self.mixed_adapters:
            inputs["adapter_names"] = [row.request.adapter or BASE_ADAPTER for row in inputs.pop("_rows")]
        else:
            inputs.pop("_rows", None)
        self.forward_passes += 1
        output = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return cast("torch.Tensor", output.logits[:, -1, :]).float()

    def _admit(self, free: int) -> None:
        group: list[RowRequest] = []
        width = 0
        while self.queue and len(group) < free:
            candidate = self.queue[0]
            new_width = max(width, len(candidate.prompt))
            if group and new_width * (len(group) + 1) > self.max_prefill_tokens:
                break
            group.append(self.queue.popleft())
            width = new_width
        # Identical prompts (n samples of one question) are prefilled once and their cache rows repeated.
        unique: dict[tuple[int, ...], int] = {}
        for request in group:
            unique.setdefault(tuple(request.prompt), len(unique))
        prompts = list(unique)
        # A mixed-adapter batch needs the adapter per prefilled row, so prompts are unique per (prompt, adapter) there.
        if self.mixed_adapters:
            keyed: dict[tuple[tuple[int, ...], str | None], int] = {}
            for request in group:
                keyed.setdefault((tuple(request.prompt), request.adapter), len(keyed))
            prefill_rows = [_Row(RowRequest(list(p), 1, adapter=a), None) for p, a in keyed]
            source = [keyed[(tuple(request.prompt), request.adapter)] for request in group]
            prompts = [p for p, _ in keyed]
        else:
            prefill_rows = []
            source = [unique[tuple(request.prompt)] for request in group]
        pad = [width - len(prompt) for prompt in prompts]
        input_ids = torch.tensor(
            [[self.pad_id] * p + list(prompt) for p, prompt in zip(pad, prompts, strict=True)],
            dtype=torch.long,
            device=self.device,
        )
        mask = (
            torch.arange(width, device=self.device)[None, :] >= torch.tensor(pad, device=self.device)[:, None]
        ).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, _rows=prefill_rows
        )
        index = torch.tensor(source, dtype=torch.long, device=self.device)
        if len(prompts) != len(group) or source != list(range(len(group))):
            _select_rows(cache, index)
            mask = mask.index_select(0, index)
            logits = logits.index_select(0, index)
        lengths = torch.tensor([len(request.prompt) for request in group], dtype=torch.long, device=self.device)
        new_rows = [_Row(request, self._generator(request.seed)) for request in group]
        self._merge(cache, mask, lengths, new_rows)
        # The first generated token comes from the prefill's logits.
        start = len(self.rows) - len(new_rows)
        self._sample_and_advance(logits, start)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, rows: list[_Row]) -> None:
        placeholder = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=self.device)
        if self._cache is None or self._mask is None or self._positions is None or self._last is None:
            self._cache, self._mask, self._positions, self._last = cache, mask, positions, placeholder
            self.rows = rows
            return
        running, incoming = self._mask.shape[1], mask.shape[1]
        width = max(running, incoming)
        for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, placeholder])
        self.rows.extend(rows)

    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None and self._positions is not None
        assert self._last is not None
        ones = torch.ones((len(self.rows), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        logits = self._forward(
            input_ids=self._last[:, None],
            attention_mask=self._mask,
            position_ids=self._positions[:, None],
            cache=self._cache,
            _rows=self.rows,
        )
        self._positions = self._positions + 1
        self._sample_and_advance(logits, 0)

    def _sample_and_advance(self, logits: torch.Tensor, start: int) -> None:
        """Pick the next token of rows[start:] from `logits` (one row each), record it and retire finished rows."""
        rows = self.rows[start:]
        chosen = self._choose(logits, rows)
        assert self._last is not None
        self._last[start:] = torch.tensor(chosen, dtype=torch.long, device=self.device)
        finished: list[int] = []
        for offset, (row, token) in enumerate(zip(rows, chosen, strict=True)):
            row.tokens.append(token)
            request = row.request
            if request.on_tokens is not None and request.on_tokens(list(row.tokens)):
                row.cancelled = True
            if row.cancelled or token in self._eos or len(row.tokens) >= request.max_new_tokens or self._hit_stop(row):
                finished.append(start + offset)
        if finished:
            self._retire(finished)

    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        """The next token of every row, with a single device-to-host copy (one sync per step on a GPU)."""
        scores = logits
        for index, row in enumerate(rows):
            if row.request.processor is not None:
                generated = torch.tensor([row.tokens], dtype=torch.long, device=self.device)
                scores[index : index + 1] = row.request.processor(generated, scores[index : index + 1].clone())
        chosen = scores.argmax(-1)
        sampled = [index for index, row in enumerate(rows) if row.request.temperature > 0]
        if sampled:
            picks = _sample_rows(
                scores[sampled],
                torch.tensor([rows[i].request.temperature for i in sampled], device=self.device),
                [rows[i].request.top_p for i in sampled],
                [rows[i].generator for i in sampled],
            )
            chosen[sampled] = picks
        return [int(token) for token in chosen.tolist()]

    def _hit_stop(self, row: _Row) -> bool:
        stop = [s for s in row.request.stop if s]
        if not stop:
            return False
        window = 4 * max(len(s) for s in stop) + 2
        tail = str(
            self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        if any(s in tail for s in stop):
            row.stopped_at = len(row.tokens)
            return True
        return False

    def _retire(self, finished: list[int]) -> None:
        """Take finished rows out of the batch, then hand each its completion (so a callback sees it gone)."""
        assert self._cache is not None and self._mask is not None and self._positions is not None
        assert self._last is not None
        done = set(finished)
        now = time.perf_counter()
        results: list[tuple[RowRequest, Completion]] = []
        for index in finished:
            row = self.rows[index]
            request = row.request
            stopped_at = len(row.tokens) if row.cancelled and row.stopped_at is None else row.stopped_at
            completion = finish_completion(
                self.tokenizer,
                row.tokens,
                eos_ids=self.eos_ids,
                stop=request.stop,
                stopped_at=stopped_at,
                prompt_tokens=len(request.prompt),
                latency_s=now - request.submitted,
            )
            results.append((request, completion))
        keep = [index for index in range(len(self.rows)) if index not in done]
        self.rows = [self.rows[index] for index in keep]
        if keep:
            selected = torch.tensor(keep, dtype=torch.long, device=self.device)
            mask = self._mask.index_select(0, selected)
            # Columns that are padding for every remaining row carry no information: drop them.
            leading = int((mask.cumsum(-1) == 0).sum(-1).min().item())
            _select_rows(self._cache, selected, leading)
            self._mask = mask[:, leading:]
            self._positions = self._positions.index_select(0, selected)
            self._last = self._last.index_select(0, selected)
        else:
            self._cache = self._mask = self._positions = self._last = None
        for request, completion in results:
            if request.on_done is not None:
                request.on_done(completion)


# Nucleus sampling looks at the most likely tokens first; only when they hold less than top_p is the full vocabulary
# sorted. Exact either way: the nucleus is the same set of tokens.
_NUCLEUS_CANDIDATES = 1024


def _gumbel(shape: tuple[int, int], generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """Gumbel noise, one row per generator: a row with its own generator draws from it, the others share torch's."""
    uniform = torch.rand(shape, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(shape[1], device=device, generator=generator)
    return -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))


def _sample_rows(
    scores: torch.Tensor,
    temperatures: torch.Tensor,
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Draw one token per row from `scores / temperature` restricted to each row's nucleus (top-p), batched.

    The draw is Gumbel-max over the kept tokens, which samples their renormalised probabilities exactly. Rows with
    top-p 1 keep every token; the others rank their `_NUCLEUS_CANDIDATES` most likely tokens, and only a row whose
    nucleus reaches past those ranks its whole vocabulary.
    """
    probabilities = (scores / temperatures[:, None]).softmax(-1)
    picks = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    full = [row for row, top_p in enumerate(top_ps) if top_p >= 1.0]
    if full:
        noise = _gumbel((len(full), probabilities.shape[1]), [generators[row] for row in full], scores.device)
        picks[full] = (probabilities[full].clamp(min=1e-30).log() + noise).argmax(-1)
    nucleus = [row for row, top_p in enumerate(top_ps) if top_p < 1.0]
    if not nucleus:
        return picks
    top_p = torch.tensor([top_ps[row] for row in nucleus], device=scores.device, dtype=probabilities.dtype)
    k = min(_NUCLEUS_CANDIDATES, probabilities.shape[-1])
    top, index = torch.topk(probabilities[nucleus], k, dim=-1)
    if bool((top.sum(-1) < top_p).any()):
        # Some nucleus reaches past the candidates: rank these rows' whole vocabulary instead.
        top, index = torch.sort(probabilities[nucleus], dim=-1, descending=True)
    # A token stays while the mass before it is below top_p (the best token always stays).
    keep = (top.cumsum(-1) - top) < top_p[:, None]
    noise = _gumbel((len(nucleus), top.shape[1]), [generators[row] for row in nucleus], scores.device)
    ranked = torch.where(keep, top.clamp(min=1e-30).log() + noise, torch.full_like(top, float("-inf")))
    picks[nucleus] = index.gather(-1, ranked.argmax(-1, keepdim=True)).squeeze(-1)
    return picks


class _KV(Protocol):
    keys: torch.Tensor
    values: torch.Tensor


def _layers(cache: DynamicCache) -> list[_KV]:
    """The cache's layers, which `supports_continuous_batching` checked are filled `DynamicLayer`s."""
    return cast("list[_KV]", cache.layers)


def _select_rows(cache: DynamicCache, index: torch.Tensor, leading: int = 0) -> None:
    """Keep the rows `index` of every layer (in that order), dropping the first `leading` columns."""
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, leading:]
        layer.values = layer.values.index_select(0, index)[:, :, leading:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context."""

    def __init__(self, index: int, tokens: int, context: int) -> None:
        super().__init__(
            f"prompt {index} has {tokens} tokens but the model's context is {context}: shorten it or use a model "
            "with a longer context"
        )
        self.index = index
        self.tokens = tokens
        self.context = context


def context_length(model: PreTrainedModel) -> int | None:
    """The model's context window in tokens, when its config says."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def row_seed(seed: int | None, prompt: int, sample: int) -> int | None:
    """A distinct, reproducible seed for sample `sample` of prompt `prompt`."""
    if seed is None:
        return None
    return (seed * 1_000_003 + prompt * 1_009 + sample) % (2**63)


def answer_chats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int | None,
    batch_size: int,
    stop: Sequence[str] = (),
    on_prompt: Callable[[int, list[Completion]], None] | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> list[list[Completion]]:
    """Generate `n` completions for each conversation with continuous batching, in the conversations' order.

    `batch_size` bounds the rows decoded together. Greedy decoding (temperature 0) runs one row per prompt and repeats
    its answer. `on_prompt(id, completions)` is called as soon as all samples of a prompt are done; a prompt's id is
    its position, or its entry in `prompt_ids` (which also seeds its samples, so a subset of a larger job samples
    each prompt as the whole job would). A prompt that
    does not fit the context raises PromptTooLongError before anything is generated; one that fits but leaves less
    room than `max_new_tokens` gets what room there is. Models whose cache cannot be batched continuously fall back
    to length-sorted `generate` batches.
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must all be at least 1")
    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(conversations)))
    if len(ids) != len(conversations):
        raise ValueError("prompt_ids must name every conversation")
    prompts = encode_chats(tokenizer, conversations)
    context = context_length(model)
    if context is not None:
        for index, prompt in enumerate(prompts):
            if len(prompt) >= context:
                raise PromptTooLongError(ids[index], len(prompt), context)
    if not supports_continuous_batching(model):
        results = generate_chats(
            model,
            tokenizer,
            conversations,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            stop=stop,
        )
        if on_prompt is not None:
            for index, completions in enumerate(results):
                on_prompt(ids[index], completions)
        return results
    sampling = temperature > 0
    per_prompt = n if sampling else 1
    collected: list[list[Completion]] = [[] for _ in prompts]

    def finisher(index: int) -> Callable[[Completion], None]:
        def done(completion: Completion) -> None:
            collected[index].append(completion)
            if len(collected[index]) == per_prompt:
                if not sampling:
                    collected[index] = collected[index] * n
                if on_prompt is not None:
                    on_prompt(ids[index], collected[index])

        return done

    batcher = ContinuousBatcher(model, tokenizer, max_batch_size=batch_size)
    requests = [
        RowRequest(
            prompt=prompt,
            max_new_tokens=min(max_new_tokens, context - len(prompt)) if context is not None else max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop),
            seed=row_seed(seed, ids[index], sample) if sampling else None,
            on_done=finisher(index),
        )
        for index, prompt in enumerate(prompts)
        for sample in range(per_prompt)
    ]
    batcher.run(requests)
    return collected
