"""From chat rows to tokenised training examples: the validation split, the chat template, answer-only labels."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from llamaduo.data.rows import ChatRow, validate_turns
from llamaduo_trainer.errors import NO_TRAINABLE_TOKENS, TrainingError

logger = logging.getLogger("llamaduo_trainer.finetune")

IGNORE_INDEX = -100
MIN_ROWS_FOR_VALIDATION = 5


def chat_examples(rows: Sequence[ChatRow]) -> list[dict[str, list[dict[str, str]]]]:
    """Turn chat rows into conversational prompt-completion examples, so only the final answer carries loss."""
    if not rows:
        raise TrainingError(NO_TRAINABLE_TOKENS, "no training rows: fine-tuning needs at least one chat row")
    examples: list[dict[str, list[dict[str, str]]]] = []
    for index, row in enumerate(rows):
        # DatasetError is a ValueError; its message names the row and what is wrong with it.
        validate_turns(row, f"training row {index}")
        examples.append(
            {
                "prompt": [message.model_dump() for message in row.prompt_messages],
                "completion": [row.messages[-1].model_dump()],
            }
        )
    return examples


def validation_size(rows: int, fraction: float) -> int:
    """Rows held out for validation: `fraction` of them, at least one, and none below 5 rows or at fraction 0."""
    if fraction <= 0 or rows < MIN_ROWS_FOR_VALIDATION:
        return 0
    return min(rows - 1, max(1, round(rows * fraction)))


def validation_indices(rows: int, fraction: float, seed: int) -> set[int]:
    """The indices of the rows held out for validation, drawn with `seed`."""
    return set(random.Random(seed).sample(range(rows), validation_size(rows, fraction)))


def split_validation(rows: Sequence[ChatRow], fraction: float, seed: int) -> tuple[list[ChatRow], list[ChatRow]]:
    """Split the training rows into (train, validation), the held-out rows drawn with `seed`; order kept in both."""
    held_out = validation_indices(len(rows), fraction, seed)
    train = [row for index, row in enumerate(rows) if index not in held_out]
    validation = [row for index, row in enumerate(rows) if index in held_out]
    return train, validation


@dataclass(frozen=True)
class Tokenized:
    """A tokenised split: `input_ids` and `labels` (-100 outside the answer), rows without answer tokens dropped."""

    dataset: datasets.Dataset
    rows: int
    dropped: int
    cut: int
    tokens: int
    answer_tokens: int


@contextmanager
def datasets_progress_off() -> Iterator[None]:
    """`Dataset.map` draws a progress bar per pass; the service logs its own progress."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation: bool) -> list[int]:
    encoded: Any = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation
    )
    return list(encoded["input_ids"])


def tokenize_examples(
    examples: list[dict[str, list[dict[str, str]]]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    split: str = "training",
) -> Tokenized:
    """Render each example with the chat template, label only the answer (with its end-of-turn), cut at max_length.

    The answer starts where the rendered prompt (with the generation prompt) and the rendered conversation diverge, as
    in trl. A row whose prompt alone fills `max_length` has no answer token left and is dropped (with a warning);
    `no_trainable_tokens` when no row is left.
    """

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        prompt_ids = _chat_ids(tokenizer, example["prompt"], generation=True)
        full_ids = _chat_ids(tokenizer, example["prompt"] + example["completion"], generation=False)
        start = _common_prefix(prompt_ids, full_ids)
        labels = [IGNORE_INDEX] * start + full_ids[start:]
        return {
            "input_ids": full_ids[:max_length],
            "labels": labels[:max_length],
            "cut": len(full_ids) > max_length,
            "answer": sum(label != IGNORE_INDEX for label in labels[:max_length]),
        }

    with datasets_progress_off():
        dataset = datasets.Dataset.from_list(examples).map(tokenize, remove_columns=["prompt", "completion"])
        kept = dataset.filter(lambda example: example["answer"] > 0)
    dropped = len(dataset) - len(kept)
    if len(kept) == 0:
        raise TrainingError(
            NO_TRAINABLE_TOKENS,
            f"every {split} row's prompt fills training.max_length={max_length} tokens, leaving no answer token to "
            "train on; raise training.max_length",
        )
    if dropped:
        logger.warning(
            "%d of %d %s rows dropped: the prompt alone fills max_length=%d tokens",
            dropped,
            len(dataset),
            split,
            max_length,
        )
    import pyarrow.compute as pc

    # Counted in Arrow: turning every row into Python lists would cost gigabytes on a 256k-row dataset.
    table = kept.with_format("arrow")
    cut = int(pc.sum(table["cut"]).as_py() or 0)
    if cut:
        logger.warning(
            "%d %s rows reach max_length=%d tokens: their answers are cut short and lose the end-of-turn token",
            cut,
            split,
            max_length,
        )
    tokens = int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
    answer_tokens = int(pc.sum(table["answer"]).as_py() or 0)
    return Tokenized(
        dataset=kept.remove_columns(["cut", "answer"]),
        rows=len(kept),
        dropped=dropped,
        cut=cut,
        tokens=tokens,
        answer_tokens=answer_tokens,
    )


__all__ = [
    "IGNORE_INDEX",
    "Tokenized",
    "chat_examples",
    "datasets_progress_off",
    "split_validation",
    "tokenize_examples",
    "validation_indices",
    "validation_size",
]
