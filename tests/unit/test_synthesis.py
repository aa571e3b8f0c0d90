"""The synthesizer's domain logic against the scripted service LLM: seeding, dedup, decontamination, caps, cache."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamaduo.contract.spec import SynthesisSpec, TaskSpec
from llamaduo.data.rows import ChatRow, make_row
from llamaduo.store import LocalStore
from llamaduo_synthesizer.synthesis import normalize, synthesize
from tests.support.llm import make_service_llm
from tests.support.scripted_llm import ScriptedLLM

TASK = TaskSpec(name="unit conversion", description="Convert between metric and imperial units.")
_SEED = re.compile(r"<example_instruction>\s*(.*?)\s*</example_instruction>", re.DOTALL)


def seeds() -> list[ChatRow]:
    return [
        make_row("Convert 5 km to miles.", "5 km is about 3.11 miles.", category="distance", origin="coverage"),
        make_row("Convert 10 kg to pounds.", "10 kg is about 22.05 pounds.", category="mass", origin="coverage"),
        make_row("Convert 2 litres to gallons.", "2 litres is about 0.53 US gallons.", category="volume"),
    ]


def held_out() -> list[ChatRow]:
    return [
        make_row("Convert 100 F to Celsius.", "100 F is about 37.8 C.", origin="coverage"),
        make_row("Convert 3 feet to metres.", "3 feet is about 0.91 metres.", origin="coverage"),
    ]


def seed_of(body: dict[str, Any]) -> str:
    match = _SEED.search(body["messages"][-1]["content"])
    assert match
    return match.group(1)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as scripted:
        yield scripted


@pytest.fixture
def server(shared_server: ScriptedLLM) -> ScriptedLLM:
    # One server per module (starting one costs ~0.2 s); every test starts from its initial state.
    shared_server.reset()
    return shared_server


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


async def run(server: ScriptedLLM, store: LocalStore, **overrides: Any) -> Any:
    arguments: dict[str, Any] = {
        "synthesis": SynthesisSpec(pairs_per_call=4),
        "task": TASK,
        "new_rows": 10,
        "cache_scope": "mig-synth",
        "round_index": 0,
        "seed": 7,
    }
    arguments.update(overrides)
    train = arguments.pop("seeds", seeds())
    test = arguments.pop("test_rows", held_out())
    existing = arguments.pop("existing", train)
    async with make_service_llm(server, store, temperature=0.9) as llm:
        return await synthesize(train, test, existing, llm, **arguments)


async def test_new_rows_are_kept_with_seed_category(server: ScriptedLLM, store: LocalStore) -> None:
    progress: list[tuple[int, int]] = []
    outcome = await run(server, store, on_progress=lambda kept, total: progress.append((kept, total)))
    assert len(outcome.rows) == 10
    assert outcome.calls == 3 and len(server.requests) == 3
    assert outcome.removed == {"empty": 0, "too_long": 0, "test_prompt": 0, "exact_duplicate": 0}
    assert all(row.origin == "synthetic" for row in outcome.rows)
    assert len({normalize(row.prompt) for row in outcome.rows}) == 10
    by_seed = {row.prompt: row.category for row in seeds()}
    for row in outcome.rows:
        # The scripted generator names the seed it was shown: "Variation N of: <seed instruction>".
        assert row.category == by_seed[row.prompt.split(" of: ", 1)[1]]
    assert progress[-1] == (10, 10)
    assert outcome.spend.calls == 3 and outcome.spend.completion_tokens > 0
    body = server.requests[0]
    schema = body["response_format"]["json_schema"]
    assert schema["name"] == "synthetic_pairs"
    assert schema["schema"]["properties"]["pairs"]["maxItems"] == 4
    assert schema["schema"]["properties"]["pairs"]["minItems"] == 1
    assert body["temperature"] == 0.9


async def test_seeds_are_drawn_without_replacement_and_cycle(server: ScriptedLLM, store: LocalStore) -> None:
    outcome = await run(server, store, new_rows=24)  # 6 calls over 3 seeds
    assert outcome.calls == 6
    used = [seed_of(body) for body in server.requests]
    assert Counter(used) == Counter({row.prompt: 2 for row in seeds()})


async def test_no_test_row_ever_reaches_the_generator(server: ScriptedLLM, store: LocalStore) -> None:
    leaked = make_row("Convert 3 feet to metres.", "3 feet is about 0.91 metres.", category="distance")
    outcome = await run(server, store, seeds=[*seeds(), leaked], new_rows=24)
    assert outcome.seeds_excluded == 1
    sent = server.prompts_text()
    for row in held_out():
        assert row.prompt not in sent
        assert row.reference not in sent


async def test_duplicates_test_prompts_empty_and_long_pairs_are_dropped(server: ScriptedLLM, store: LocalStore) -> None:
    served: list[int] = []

    def pairs(body: dict[str, Any], count: int) -> list[dict[str, str]]:
        served.append(count)
        n = len(served)
        return [
            {"instruction": f"Convert {n} miles to km.", "response": f"{n} miles is {n * 1.609:.2f} km."},
            {"instruction": f"  convert {n} MILES to km!  ", "response": "duplicate after normalisation"},
            {"instruction": "Convert 100 F to Celsius", "response": "a test prompt, decontaminated"},
            {"instruction": "convert 5 km to miles", "response": "an existing train instruction"},
            {"instruction": "   ", "response": "no instruction"},
            {"instruction": f"Describe unit number {n}.", "response": "x" * 9000},
        ]

    server.pairs_factory = pairs
    outcome = await run(server, store, synthesis=SynthesisSpec(pairs_per_call=6), new_rows=3)
    assert [row.prompt for row in outcome.rows] == [f"Convert {n} miles to km." for n in (1, 2, 3)]
    # The third call's first pair completes the round: the pairs after it are not examined.
    assert outcome.removed == {"empty": 2, "too_long": 2, "test_prompt": 2, "exact_duplicate": 4}
    assert outcome.calls == 3 and served == [6, 6, 6]


async def test_call_cap_stops_a_generator_that_only_repeats(server: ScriptedLLM, store: LocalStore) -> None:
    server.pairs_factory = lambda body, count: [{"instruction": "Convert 5 km to miles.", "response": "again"}]
    outcome = await run(server, store, synthesis=SynthesisSpec(pairs_per_call=2, max_calls_per_round=5))
    assert outcome.rows == []
    assert outcome.calls == 5 and len(server.requests) == 5
    assert outcome.removed["exact_duplicate"] == 5
    default_cap = await run(server, store, synthesis=SynthesisSpec(pairs_per_call=4), new_rows=8, round_index=1)
    assert default_cap.calls == 4 * 2


async def test_unusable_replies_are_failed_calls(store: LocalStore) -> None:
    with ScriptedLLM(fault_rate=1.0, fault_kinds=("malformed",)) as server:
        outcome = await run(server, store, new_rows=4)
        assert len(server.requests) == 4 * 3
    assert outcome.rows == [] and outcome.calls == 4 and outcome.failed_calls == 4
    assert outcome.spend.calls == 12


async def test_redelivered_round_is_replayed_from_cache(server: ScriptedLLM, store: LocalStore) -> None:
    first = await run(server, store)
    sent = len(server.requests)
    again = await run(server, store)
    assert len(server.requests) == sent
    assert again.rows == first.rows
    assert again.spend.calls == first.spend.calls and again.spend.cached_calls == again.spend.calls
    # The next round asks new questions even with the same seeds.
    await run(server, store, round_index=1)
    assert len(server.requests) > sent


async def test_seed_system_prompt_travels_with_new_rows(server: ScriptedLLM, store: LocalStore) -> None:
    with_system = ChatRow.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "Convert 1 mile to km."},
                {"role": "assistant", "content": "1 mile is about 1.61 km."},
            ],
            "category": "distance",
        }
    )
    outcome = await run(server, store, seeds=[with_system], new_rows=2)
    assert all(row.messages[0].content == "Answer in one sentence." for row in outcome.rows)
    assert all([m.role for m in row.messages] == ["system", "user", "assistant"] for row in outcome.rows)


async def test_only_contaminated_seeds_is_an_error(server: ScriptedLLM, store: LocalStore) -> None:
    with pytest.raises(ValueError, match="train seeds"):
        await run(server, store, seeds=held_out())
    assert server.requests == []
