"""Chat rows: the JSONL format of coverage, train, test and synthetic data."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the problem and where it is."""


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRow(BaseModel):
    """One example: a conversation whose last assistant turn is the reference answer."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    messages: list[Message]
    category: str | None = None
    split: Literal["train", "test"] | None = None
    origin: Literal["coverage", "synthetic"] = "coverage"

    @property
    def prompt_messages(self) -> list[Message]:
        """Every turn before the final assistant answer."""
        return self.messages[:-1]

    @property
    def prompt(self) -> str:
        """The last user turn: what the model is asked."""
        return next(m.content for m in reversed(self.prompt_messages) if m.role == "user")

    @property
    def reference(self) -> str:
        """The final assistant turn: the human reference answer."""
        return self.messages[-1].content


def validate_turns(row: ChatRow, where: str) -> None:
    """Raise `DatasetError` unless the row has a user turn and ends with a non-empty assistant turn."""
    if not any(m.role == "user" and m.content.strip() for m in row.messages):
        raise DatasetError(f"{where}: the row has no user turn")
    if not row.messages or row.messages[-1].role != "assistant":
        raise DatasetError(f"{where}: the row does not end with an assistant turn")
    if not row.messages[-1].content.strip():
        raise DatasetError(f"{where}: the assistant turn is empty")


def parse_jsonl(data: bytes, source: str) -> list[ChatRow]:
    """Parse and validate JSONL chat rows; errors name `source` and the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source}: not UTF-8 text ({exc})") from exc
    rows: list[ChatRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(raw, dict) or "messages" not in raw:
            raise DatasetError(f"{where}: expected an object with a 'messages' list")
        try:
            row = ChatRow.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(map(str, first["loc"]))
            raise DatasetError(f"{where}: {field}: {first['msg']}") from exc
        validate_turns(row, where)
        rows.append(row)
    if not rows:
        raise DatasetError(f"{source}: the dataset is empty")
    return rows


def dump_jsonl(rows: Iterable[ChatRow]) -> bytes:
    """Serialise rows as JSONL (one object a line, UTF-8)."""
    return "".join(row.model_dump_json(exclude_none=True) + "\n" for row in rows).encode()


def conversation(row: ChatRow) -> list[dict[str, str]]:
    """The prompt turns as plain dicts, ready for a chat template or the OpenAI API."""
    return [m.model_dump() for m in row.prompt_messages]


def make_row(prompt: str, answer: str, *, category: str | None = None, origin: str = "synthetic") -> ChatRow:
    """A single-turn row."""
    return ChatRow.model_validate(
        {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "category": category,
            "origin": origin,
        }
    )


SplitName = Literal["train", "test"]
__all__ = [
    "ChatRow",
    "DatasetError",
    "Message",
    "SplitName",
    "conversation",
    "dump_jsonl",
    "make_row",
    "parse_jsonl",
    "validate_turns",
]
