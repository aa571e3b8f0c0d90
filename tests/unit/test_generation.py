"""Batched chat generation (`llamaduo_inferencer.generation`) on the tiny random model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from llamaduo.localmodel import load_causal_lm, load_tokenizer
from llamaduo_inferencer.generation import (
    Completion,
    encode_chats,
    finish_completion,
    generate_chats,
    load_with_adapter,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

Model = PreTrainedModel
Tokenizer = PreTrainedTokenizerBase

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "How are you today, friend?"}],
    [{"role": "user", "content": "Write a haiku about the sea"}],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three?"},
    ],
    [
        {
            "role": "user",
            "content": "A considerably longer question, which asks about many, many things at once: what, why?",
        }
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return load_causal_lm(tiny_model_dir, "cpu")


def _generate(
    model: Model,
    tokenizer: Tokenizer,
    conversations: list[list[dict[str, str]]] = CONVERSATIONS,
    **overrides: Any,
) -> list[list[Completion]]:
    options = {
        "n": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 8,
        "seed": 0,
        "batch_size": 4,
    } | overrides
    return generate_chats(model, tokenizer, conversations, **options)


class ForceEosAt(LogitsProcessor):
    """Makes every row end with eos after `step` ordinary tokens."""

    def __init__(self, step: int, eos_id: int) -> None:
        self.step = step
        self.eos_id = eos_id
        self.calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.calls == self.step:
            scores.fill_(float("-inf"))
            scores[:, self.eos_id] = 0.0
        else:
            scores[:, self.eos_id] = float("-inf")
        self.calls += 1
        return scores


def test_results_keep_the_conversations_order_and_give_n_answers_each(model: Model, tokenizer: Tokenizer) -> None:
    progress: list[tuple[int, int]] = []
    results = _generate(
        model, tokenizer, n=3, batch_size=4, on_batch=lambda done, total: progress.append((done, total))
    )
    expected_prompt_tokens = [len(prompt) for prompt in encode_chats(tokenizer, CONVERSATIONS)]
    assert len(set(expected_prompt_tokens)) == len(CONVERSATIONS), "distinct lengths make the order observable"
    assert [len(completions) for completions in results] == [3] * len(CONVERSATIONS)
    assert [completions[0].prompt_tokens for completions in results] == expected_prompt_tokens
    # batch_size counts sequences: 4 // n=3 leaves one prompt per batch.
    assert progress == [(done, len(CONVERSATIONS)) for done in range(1, len(CONVERSATIONS) + 1)]
    for completions in results:
        assert len({completion.text for completion in completions}) == 3, "samples of one prompt differ"
        for completion in completions:
            assert completion.completion_tokens == 8
            assert completion.finish_reason == "length"
            assert completion.latency_s > 0


def test_batches_hold_batch_size_sequences(model: Model, tokenizer: Tokenizer) -> None:
    progress: list[int] = []
    _generate(model, tokenizer, n=2, batch_size=4, max_new_tokens=2, on_batch=lambda done, total: progress.append(done))
    assert progress == [2, 4, 5]


def test_a_seed_makes_sampling_reproducible(model: Model, tokenizer: Tokenizer) -> None:
    first = _generate(model, tokenizer, CONVERSATIONS[:3], n=2, seed=7)
    again = _generate(model, tokenizer, CONVERSATIONS[:3], n=2, seed=7)
    other = _generate(model, tokenizer, CONVERSATIONS[:3], n=2, seed=8)
    texts = [[c.text for c in completions] for completions in first]
    assert texts == [[c.text for c in completions] for completions in again]
    assert texts != [[c.text for c in completions] for completions in other]


def test_greedy_decoding_repeats_one_answer_n_times(model: Model, tokenizer: Tokenizer) -> None:
    results = _generate(model, tokenizer, CONVERSATIONS[:2], n=3, temperature=0.0, seed=None)
    for completions in results:
        assert len(completions) == 3
        assert len({completion.text for completion in completions}) == 1
    alone = _generate(model, tokenizer, CONVERSATIONS[1:2], temperature=0.0, seed=None, batch_size=1)
    assert alone[0][0].text == results[1][0].text, "left padding must not change a prompt's answer"


def test_stop_strings_cut_the_text_and_finish_with_stop(model: Model, tokenizer: Tokenizer) -> None:
    plain = _generate(model, tokenizer, CONVERSATIONS[:1], max_new_tokens=16, seed=3)[0][0]
    assert len(plain.text) > 12
    stop = plain.text[6:10]
    cut_at = plain.text.find(stop)
    stopped = _generate(model, tokenizer, CONVERSATIONS[:1], max_new_tokens=16, seed=3, stop=[stop, "never-seen"])[0][0]
    assert stopped.text == plain.text[:cut_at]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < plain.completion_tokens


def test_eos_ends_a_row_and_counts_as_a_completion_token(model: Model, tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_id
    results = _generate(
        model, tokenizer, CONVERSATIONS[:3], n=2, max_new_tokens=10, logits_processors=lambda: [ForceEosAt(4, eos)]
    )
    for completions in results:
        for completion in completions:
            assert completion.finish_reason == "stop"
            assert completion.completion_tokens == 5
            assert completion.text == tokenizer.decode(
                tokenizer(completion.text, add_special_tokens=False)["input_ids"]
            )


def test_finish_completion_accounting(tokenizer: Tokenizer) -> None:
    ids = tokenizer("Hello world, said the cat", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id

    def finish(tokens: list[int], stop: tuple[str, ...], stopped_at: int | None) -> Completion:
        return finish_completion(
            tokenizer, tokens, eos_ids=[eos], stop=stop, stopped_at=stopped_at, prompt_tokens=11, latency_s=0.5
        )

    ended = finish([*ids, eos, eos, eos], (), None)
    assert (ended.text, ended.completion_tokens, ended.finish_reason) == (
        "Hello world, said the cat",
        len(ids) + 1,
        "stop",
    )
    cut = finish([*ids, eos], (", said",), len(ids) - 2)
    assert (cut.text, cut.completion_tokens, cut.finish_reason) == ("Hello world", len(ids) - 2, "stop")
    running = finish(ids, ("dog",), None)
    assert (running.completion_tokens, running.finish_reason, running.prompt_tokens) == (len(ids), "length", 11)


def test_invalid_arguments_are_rejected(model: Model, tokenizer: Tokenizer) -> None:
    assert _generate(model, tokenizer, []) == []
    with pytest.raises(ValueError, match="at least 1"):
        _generate(model, tokenizer, n=0)


def test_load_with_adapter_applies_the_adapter(
    model: Model, tokenizer: Tokenizer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    base = load_causal_lm(tiny_model_dir, "cpu")
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(str(tmp_path / "adapter"))
    adapted = load_with_adapter(tiny_model_dir, tmp_path / "adapter", "cpu")
    assert isinstance(adapted, PeftModel)
    inputs = torch.tensor([encode_chats(tokenizer, CONVERSATIONS[:1])[0]])
    with torch.inference_mode():
        assert not torch.allclose(adapted(inputs).logits, model(inputs).logits)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_with_adapter(tiny_model_dir, tmp_path, "cpu")
