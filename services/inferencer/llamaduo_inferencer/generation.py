"""Batched chat generation with a local causal LM: many conversations, n samples each, in few `generate` calls."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]
Message = dict[str, str]
# Called with the tokens generated so far (one row per sequence); returning True stops every row.
StepCallback = Callable[[torch.Tensor], bool | None]


@dataclass(frozen=True)
class Completion:
    """One generated answer with its token accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    latency_s: float


def encode_chats(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Render each conversation with the chat template (generation prompt added) and tokenize it."""
    encoded: list[list[int]] = []
    for conversation in conversations:
        rendered = tokenizer.apply_chat_template(
            [dict(message) for message in conversation], tokenize=False, add_generation_prompt=True
        )
        # The template already writes the special tokens (bos, role markers) the model expects.
        encoded.append(list(tokenizer(str(rendered), add_special_tokens=False)["input_ids"]))
    return encoded


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return every token id that ends a sequence for this model (generation config and tokenizer)."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured is not None:
        ids.extend(int(token) for token in configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


class StopOnStrings(StoppingCriteria):
    """Stops each row once its generated text contains a stop string, and records how many tokens that took."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], prompt_length: int) -> None:
        """Watch the tokens after `prompt_length` for any of `stop`."""
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_length = prompt_length
        # A stop string of c characters spans at most 4c tokens (one UTF-8 byte per token in the worst case).
        self.window = 4 * max((len(s) for s in self.stop), default=1) + 2
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        """Return, per row, whether a stop string has appeared in the generated text."""
        generated = input_ids[:, self.prompt_length :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done  # type: ignore[return-value]
        texts = self.tokenizer.batch_decode(
            generated[:, -self.window :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        for row, text in enumerate(texts):
            if row in self.stopped_at:
                done[row] = True
            elif any(s in text for s in self.stop):
                self.stopped_at[row] = generated.shape[1]
                done[row] = True
        return done  # type: ignore[return-value]


class StepObserver(StoppingCriteria):
    """Hands the generated tokens so far to a callback after every step (streaming, cancellation)."""

    def __init__(self, prompt_length: int, callback: StepCallback) -> None:
        """Call `callback(generated_ids)` after each decoding step; a True result stops all rows."""
        self.prompt_length = prompt_length
        self.callback = callback
        self.cancelled = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        """Report the new tokens; stop every row if the callback asks to."""
        if self.callback(input_ids[:, self.prompt_length :]):
            self.cancelled = True
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device
        )


def finish_completion(
    tokenizer: PreTrainedTokenizerBase,
    generated: Sequence[int],
    *,
    eos_ids: Sequence[int],
    stop: Sequence[str],
    stopped_at: int | None,
    prompt_tokens: int,
    latency_s: float,
) -> Completion:
    """Cut one generated row at its eos or stop string, decode it and count its tokens."""
    tokens = list(generated if stopped_at is None else generated[:stopped_at])
    finish: FinishReason = "stop" if stopped_at is not None else "length"
    count = len(tokens)
    eos = set(eos_ids)
    for position, token in enumerate(tokens):
        if token in eos:
            tokens = tokens[:position]
            count = position + 1
            finish = "stop"
            break
    text = str(tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    hits = [index for s in stop if s and (index := text.find(s)) >= 0]
    if hits:
        text = text[: min(hits)]
        finish = "stop"
    return Completion(
        text=text, prompt_tokens=prompt_tokens, completion_tokens=count, finish_reason=finish, latency_s=latency_s
    )


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's generators inside the block without disturbing the caller's random state."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    logits_processors: Sequence[LogitsProcessor] = (),
    on_step: StepCallback | None = None,
) -> list[list[Completion]]:
    """Run one left-padded `generate` call over token-id prompts, returning `n` completions per prompt.

    Greedy decoding (temperature 0) runs each prompt once and repeats the answer `n` times, since every sample
    would be identical. Rows of the generated tensor are prompt-major: row `i * n + j` is sample `j` of prompt `i`.
    """
    sampling = temperature > 0
    per_prompt = n if sampling else 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(prompt) for prompt in prompts)
    device = model.device
    input_ids = torch.tensor(
        [[pad_id] * (width - len(prompt)) + list(prompt) for prompt in prompts], dtype=torch.long, device=device
    )
    attention_mask = torch.tensor(
        [[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts], dtype=torch.long, device=device
    )
    eos_ids = eos_token_ids(model, tokenizer)
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        num_return_sequences=per_prompt,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        use_cache=True,
        **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sampling else {}),
    )
    stop_criteria = StopOnStrings(tokenizer, stop, width)
    criteria = StoppingCriteriaList([stop_criteria])
    if on_step is not None:
        criteria.append(StepObserver(width, on_step))
    started = time.perf_counter()
    # PreTrainedModel does not declare generate (GenerationMixin does, on the concrete model classes).
    generate = cast("Callable[..., torch.Tensor]", model.generate)
    with torch.inference_mode():
        output = generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList(logits_processors),
            stopping_criteria=criteria,
        )
    latency = time.perf_counter() - started
    rows = output[:, width:].tolist()
    results: list[list[Completion]] = []
    for index, prompt in enumerate(prompts):
        completions = [
            finish_completion(
                tokenizer,
                rows[index * per_prompt + sample],
                eos_ids=eos_ids,
                stop=stop,
                stopped_at=stop_criteria.stopped_at.get(index * per_prompt + sample),
                prompt_tokens=len(prompt),
                latency_s=latency,
            )
            for sample in range(per_prompt)
        ]
        results.append(completions if sampling else completions * n)
    return results


def generate_chats(
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
    on_batch: Callable[[int, int], None] | None = None,
    logits_processors: Callable[[], Sequence[LogitsProcessor]] | None = None,
) -> list[list[Completion]]:
    """Generate `n` completions for each conversation, in the conversations' order.

    Prompts are sorted by token length (longest first) so each batch pads little; a batch holds at most
    `batch_size` generated sequences (`batch_size // n` prompts when sampling, at least one). `on_batch(done, total)`
    is called with prompt counts after each batch; `logits_processors()` builds fresh (possibly stateful) processors
    for each batch. With a `seed` the whole call is reproducible.
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must all be at least 1")
    if not conversations:
        return []
    prompts = encode_chats(tokenizer, conversations)
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]), reverse=True)
    per_batch = max(1, batch_size // n) if temperature > 0 else batch_size
    results: list[list[Completion] | None] = [None] * len(prompts)
    done = 0
    with seeded(seed, model.device):
        for start in range(0, len(order), per_batch):
            chunk = order[start : start + per_batch]
            batch_results = generate_batch(
                model,
                tokenizer,
                [prompts[index] for index in chunk],
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                stop=stop,
                logits_processors=logits_processors() if logits_processors is not None else (),
            )
            for index, completions in zip(chunk, batch_results, strict=True):
                results[index] = completions
            done += len(chunk)
            if on_batch is not None:
                on_batch(done, len(prompts))
    return [completions for completions in results if completions is not None]


class AdapterMismatchError(ValueError):
    """The adapter was trained for another base model (other layer names or shapes)."""


def load_with_adapter(
    base_path: Path | str,
    adapter_dir: Path,
    device: str = "auto",
    *,
    merge: bool = False,
    load_in_4bit: bool = False,
) -> PreTrainedModel:
    """Load the base model on `device` with the PEFT adapter in `adapter_dir` applied, in eval mode.

    `merge` folds the LoRA weights into the base (faster decoding; not with a 4-bit base, whose weights cannot take
    them exactly). Raises AdapterMismatchError when the adapter does not fit the base.
    """
    from peft import PeftModel

    from llamaduo.localmodel import load_causal_lm

    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"adapter directory {adapter_dir} has no adapter_config.json")
    base = load_causal_lm(base_path, device, load_in_4bit=load_in_4bit)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as error:
        trained_for = json.loads(config_file.read_text()).get("base_model_name_or_path") or "an unnamed base"
        raise AdapterMismatchError(
            f"the adapter does not fit the base model {base_path} (it was trained for {trained_for}): "
            f"{str(error).splitlines()[0][:300]}"
        ) from error
    model.eval()
    if merge and not load_in_4bit:
        return cast("PreTrainedModel", model.merge_and_unload())
    # PeftModel forwards every attribute to the wrapped model; callers use it as one.
    return cast("PreTrainedModel", model)
