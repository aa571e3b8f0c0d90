"""The coordinator's coverage validation and split: every bad dataset gets an error that names the problem."""

import json

import pytest

from llamaduo.contract.spec import CoverageSpec
from llamaduo.data import DatasetError, make_row, parse_jsonl
from llamaduo_coordinator.coverage import split_coverage


def jsonl(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def chat(user: str, answer: str, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def test_empty_file_is_named():
    with pytest.raises(DatasetError, match="empty"):
        parse_jsonl(b"\n\n", "coverage.jsonl")


def test_invalid_json_names_the_line():
    with pytest.raises(DatasetError, match="coverage.jsonl line 2: invalid JSON"):
        parse_jsonl(jsonl(chat("a", "b"), "{not json"), "coverage.jsonl")


def test_row_without_user_turn():
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DatasetError, match="line 1: the row has no user turn"):
        parse_jsonl(jsonl(row), "c")


def test_row_without_assistant_turn():
    with pytest.raises(DatasetError, match="line 1: the row does not end with an assistant turn"):
        parse_jsonl(jsonl({"messages": [{"role": "user", "content": "q"}]}), "c")


def test_unknown_role_names_the_field():
    with pytest.raises(DatasetError, match="line 1: messages.0.role"):
        parse_jsonl(jsonl({"messages": [{"role": "robot", "content": "q"}]}), "c")


def test_too_few_rows_to_split():
    rows = [make_row(f"q{i}", f"a{i}") for i in range(4)]
    with pytest.raises(DatasetError, match="too few rows to split: 4 rows"):
        split_coverage(rows, CoverageSpec(uri="x"))


def test_seeded_split_is_deterministic_and_disjoint():
    rows = [make_row(f"question {i}", f"answer {i}") for i in range(50)]
    spec = CoverageSpec(uri="x", test_fraction=0.2, split_seed=3)
    train, test = split_coverage(rows, spec)
    assert (len(train), len(test)) == (40, 10)
    assert split_coverage(rows, spec) == (train, test)
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert split_coverage(rows, spec.model_copy(update={"split_seed": 4}))[1] != test


def test_users_own_split_is_honoured():
    rows = parse_jsonl(jsonl(*[chat(f"q{i}", f"a{i}", split="test" if i < 3 else "train") for i in range(10)]), "c")
    train, test = split_coverage(rows, CoverageSpec(uri="x"))
    assert [r.prompt for r in test] == ["q0", "q1", "q2"]
    assert len(train) == 7


def test_train_rows_repeating_a_test_prompt_are_dropped():
    rows = [make_row("same", "a"), make_row("same", "b")] + [make_row(f"q{i}", "x") for i in range(20)]
    train, test = split_coverage(rows, CoverageSpec(uri="x", test_fraction=0.5, split_seed=1))
    assert not {r.prompt for r in train} & {r.prompt for r in test}
