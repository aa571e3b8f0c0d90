"""Continuous batching (`llamaduo_inferencer.batching`) on the tiny random model: same answers as `generate`,
rows that leave early, per-row settings, seeds, cancellation, adapters per row, and prompts that do not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import llamaduo_inferencer.batching as batching
from llamaduo.localmodel import load_causal_lm, load_tokenizer
from llamaduo_inferencer.batching import (
    ContinuousBatcher,
    PromptTooLongError,
    RowRequest,
    _sample_rows,
    answer_chats,
    supports_continuous_batching,
)
from llamaduo_inferencer.generation import Completion, encode_chats, generate_chats

pytestmark = pytest.mark.usefixtures("torch_single_thread")

Model = PreTrainedModel
Tokenizer = PreTrainedTokenizerBase

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "How are you today, friend?"}],
    [{"role": "user", "content": "Write a haiku about the sea"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "3?"}],
    [{"role": "user", "content": "A considerably longer question, which asks about many, many things: what, why?"}],
    [{"role": "user", "content": "Short"}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return load_causal_lm(tiny_model_dir, "cpu")


def _answer(model: Model, tokenizer: Tokenizer, **overrides: Any) -> list[list[Completion]]:
    options: dict[str, Any] = {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 12,
        "seed": 0,
        "batch_size": 2,
    } | overrides
    conversations = options.pop("conversations", CONVERSATIONS)
    return answer_chats(model, tokenizer, conversations, **options)


def test_the_tiny_llama_qualifies_for_continuous_batching(model: Model) -> None:
    assert supports_continuous_batching(model)


def test_a_transformers_older_than_the_checked_one_falls_back_to_generate(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers 5.17-5.23 give other tokens for rows joining a running cache (seen on an H200 and here).
    monkeypatch.setattr("llamaduo_inferencer.batching.transformers.__version__", "5.23.0")
    assert not supports_continuous_batching(model)


def test_greedy_answers_equal_generate_one_prompt_at_a_time(model: Model, tokenizer: Tokenizer) -> None:
    # batch_size 2 over 6 prompts of different lengths: rows join a running batch whose cache is longer or shorter.
    ours = _answer(model, tokenizer, n=2)
    for conversation, completions in zip(CONVERSATIONS, ours, strict=True):
        alone = generate_chats(
            model, tokenizer, [conversation], n=1, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0, batch_size=1
        )[0][0]
        assert [c.text for c in completions] == [alone.text, alone.text]
        assert completions[0].completion_tokens == alone.completion_tokens
        assert completions[0].finish_reason == alone.finish_reason
        assert completions[0].prompt_tokens == alone.prompt_tokens


def test_rows_with_different_budgets_leave_the_batch_when_done(model: Model, tokenizer: Tokenizer) -> None:
    prompts = encode_chats(tokenizer, CONVERSATIONS)
    batcher = ContinuousBatcher(model, tokenizer, max_batch_size=8)
    budgets = [1, 3, 20, 5, 2, 9]
    results = batcher.run([RowRequest(prompt, budget) for prompt, budget in zip(prompts, budgets, strict=True)])
    assert [c.completion_tokens for c in results] == budgets
    assert all(c.finish_reason == "length" for c in results)
    # One prefill and 19 decoding steps: the longest row sets the pace, the others do not add steps.
    assert batcher.forward_passes == 20
    for prompt, budget, completion in zip(prompts, budgets, results, strict=True):
        alone = ContinuousBatcher(model, tokenizer).run([RowRequest(prompt, budget)])[0]
        assert completion.text == alone.text


def test_a_seed_makes_samples_reproducible_and_distinct(model: Model, tokenizer: Tokenizer) -> None:
    first = _answer(model, tokenizer, n=3, temperature=1.0, seed=7, conversations=CONVERSATIONS[:3])
    again = _answer(model, tokenizer, n=3, temperature=1.0, seed=7, conversations=CONVERSATIONS[:3])
    other = _answer(model, tokenizer, n=3, temperature=1.0, seed=8, conversations=CONVERSATIONS[:3])
    texts = [[c.text for c in completions] for completions in first]
    assert texts == [[c.text for c in completions] for completions in again]
    assert texts != [[c.text for c in completions] for completions in other]
    assert all(len(set(samples)) == 3 for samples in texts), "samples of one prompt differ"


def test_a_subset_with_prompt_ids_samples_like_the_whole_job(model: Model, tokenizer: Tokenizer) -> None:
    whole = _answer(model, tokenizer, n=2, temperature=1.0, seed=5, batch_size=1)
    done: list[int] = []
    part = _answer(
        model,
        tokenizer,
        n=2,
        temperature=1.0,
        seed=5,
        batch_size=1,
        conversations=CONVERSATIONS[3:],
        prompt_ids=[3, 4, 5],
        on_prompt=lambda index, completions: done.append(index),
    )
    assert [[c.text for c in cs] for cs in part] == [[c.text for c in cs] for cs in whole[3:]]
    assert sorted(done) == [3, 4, 5]


def test_stop_strings_and_eos_end_a_row(model: Model, tokenizer: Tokenizer) -> None:
    plain = _answer(model, tokenizer, conversations=CONVERSATIONS[:1], max_new_tokens=16)[0][0]
    assert len(plain.text) > 12
    stop = plain.text[6:10]
    stopped = _answer(model, tokenizer, conversations=CONVERSATIONS[:1], max_new_tokens=16, stop=[stop, "zzz"])[0][0]
    assert stopped.text == plain.text[: plain.text.find(stop)]
    assert (stopped.finish_reason, stopped.completion_tokens < plain.completion_tokens) == ("stop", True)

    eos = int(tokenizer.eos_token_id)

    def eos_after_three(generated: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, eos] = float("inf") if generated.shape[1] == 3 else float("-inf")
        return scores

    prompt = encode_chats(tokenizer, CONVERSATIONS[:1])[0]
    ended = ContinuousBatcher(model, tokenizer).run([RowRequest(prompt, 10, processor=eos_after_three)])[0]
    assert (ended.finish_reason, ended.completion_tokens) == ("stop", 4)


def test_a_callback_cancels_only_its_row(model: Model, tokenizer: Tokenizer) -> None:
    prompts = encode_chats(tokenizer, CONVERSATIONS[:2])
    seen: list[int] = []

    def cancel_after_two(tokens: list[int]) -> bool:
        seen.append(len(tokens))
        return len(tokens) >= 2

    results = ContinuousBatcher(model, tokenizer).run(
        [RowRequest(prompts[0], 10, on_tokens=cancel_after_two), RowRequest(prompts[1], 10)]
    )
    assert (results[0].completion_tokens, results[0].finish_reason) == (2, "stop")
    assert seen == [1, 2]
    assert (results[1].completion_tokens, results[1].finish_reason) == (10, "length")


def test_rows_use_their_own_adapter_in_one_batch(tiny_model_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = load_causal_lm(tiny_model_dir, "cpu")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        str(tmp_path / "adapter")
    )
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, "cpu"), str(tmp_path / "adapter"), "tuned")
    peft.eval()
    prompts = encode_chats(tokenizer, CONVERSATIONS[:2])
    mixed = ContinuousBatcher(peft, tokenizer, mixed_adapters=True).run(  # type: ignore[arg-type]
        [RowRequest(prompts[0], 8, adapter="tuned"), RowRequest(prompts[1], 8), RowRequest(prompts[0], 8)]
    )
    with peft.disable_adapter():
        plain = ContinuousBatcher(peft, tokenizer).run(  # type: ignore[arg-type]
            [RowRequest(prompts[0], 8), RowRequest(prompts[1], 8)]
        )
    tuned = ContinuousBatcher(peft, tokenizer).run([RowRequest(prompts[0], 8)])  # type: ignore[arg-type]
    assert mixed[0].text == tuned[0].text
    assert [mixed[1].text, mixed[2].text] == [plain[1].text, plain[0].text]
    assert mixed[0].text != mixed[2].text, "the adapter changes the answer"


def test_a_prompt_longer_than_the_context_is_refused_before_generating(model: Model, tokenizer: Tokenizer) -> None:
    huge = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(PromptTooLongError, match=r"prompt 7 has \d+ tokens but the model's context is 2048"):
        _answer(model, tokenizer, conversations=[CONVERSATIONS[0], huge], prompt_ids=[6, 7])


def test_models_that_cannot_batch_continuously_fall_back_to_generate(
    model: Model, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _answer(model, tokenizer, n=2)
    monkeypatch.setattr(batching, "supports_continuous_batching", lambda model: False)
    done: list[int] = []
    fallback = _answer(model, tokenizer, n=2, on_prompt=lambda index, completions: done.append(index))
    assert [[c.text for c in cs] for cs in fallback] == [[c.text for c in cs] for cs in expected]
    assert done == list(range(len(CONVERSATIONS)))


def test_nucleus_sampling_only_draws_from_the_nucleus() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05] + [0.0] * 2000)
    logits = probabilities.clamp(min=1e-12).log()
    flat = torch.zeros(2005)
    generator = torch.Generator().manual_seed(0)
    drawn: list[list[int]] = []
    for _ in range(300):
        # Row 0: a nucleus of two tokens; row 1: top-p 1 keeps all; row 2: a flat nucleus wider than the candidates.
        picks = _sample_rows(
            torch.stack([logits, logits, flat]), torch.ones(3), [0.75, 1.0, 0.9], [generator, None, None]
        )
        drawn.append(picks.tolist())
    assert {row[0] for row in drawn} == {0, 1}
    assert {row[1] for row in drawn} == {0, 1, 2, 3, 4}
    assert len({row[2] for row in drawn}) > 200
    zero, one = sum(row[0] == 0 for row in drawn), sum(row[0] == 1 for row in drawn)
    assert 0.5 < zero / (zero + one) < 0.75, "renormalised 0.5 : 0.3 within the nucleus"
    again = _sample_rows(torch.stack([flat]), torch.ones(1), [0.9], [torch.Generator().manual_seed(4)])
    assert (
        again.tolist()
        == _sample_rows(torch.stack([flat]), torch.ones(1), [0.9], [torch.Generator().manual_seed(4)]).tolist()
    )


def test_bad_rows_are_refused(model: Model, tokenizer: Tokenizer) -> None:
    batcher = ContinuousBatcher(model, tokenizer)
    with pytest.raises(ValueError, match="prompt token"):
        batcher.add(RowRequest([], 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        batcher.add(RowRequest([1, 2], 0))
