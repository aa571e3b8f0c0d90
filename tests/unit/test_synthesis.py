"""The synthesizer's domain logic against the scripted service LLM: seeding, filters, dedup, decontamination,
targeting, templates, caps, cache, and resuming a round from a checkpoint."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from llamaduo.contract.spec import SynthesisSpec, TaskSpec
from llamaduo.data.results import Judgment
from llamaduo.data.rows import ChatRow, make_row
from llamaduo.store import LocalStore
from llamaduo_synthesizer.prompts import DEFAULT_TEMPLATE, TemplateError, synthesis_messages, validate_template
from llamaduo_synthesizer.synthesis import (
    REASONS,
    Checkpoint,
    PairScreen,
    is_refusal,
    is_truncated,
    normalize,
    quality_problem,
    synthesize,
)
from llamaduo_synthesizer.targeting import Targeting, build_targeting, category_scores, seed_weights
from tests.support.llm import make_service_llm
from tests.support.scripted_llm import ScriptedLLM

TASK = TaskSpec(name="unit conversion", description="Convert between metric and imperial units.")
_SEED = re.compile(r"<example_instruction>\s*(.*?)\s*</example_instruction>", re.DOTALL)
LONG_TEST_PROMPT = (
    "Explain step by step how to convert a temperature of one hundred degrees Fahrenheit into degrees Celsius "
    "for a school report about the weather in July"
)
LONG_TEST_REFERENCE = (
    "Subtract thirty two from one hundred to get sixty eight then multiply sixty eight by five ninths which "
    "gives about thirty seven point eight degrees Celsius."
)
VOCABULARY = [f"{stem}{n}" for stem in ("alpha", "bravo", "delta", "kilo", "lima", "oscar", "tango") for n in range(40)]


def seeds() -> list[ChatRow]:
    return [
        make_row("Convert 5 km to miles.", "5 km is about 3.11 miles.", category="distance", origin="coverage"),
        make_row("Convert 10 kg to pounds.", "10 kg is about 22.05 pounds.", category="mass", origin="coverage"),
        make_row("Convert 2 litres to gallons.", "2 litres is about 0.53 US gallons.", category="volume"),
    ]


def held_out() -> list[ChatRow]:
    return [
        make_row("Convert 100 F to Celsius.", "100 F is about 37.8 C.", category="temperature", origin="coverage"),
        make_row("Convert 3 feet to metres.", "3 feet is about 0.91 metres.", category="distance", origin="coverage"),
        make_row(LONG_TEST_PROMPT, LONG_TEST_REFERENCE, category="temperature", origin="coverage"),
    ]


def prose(n: int, length: int = 30) -> str:
    """A sentence of words drawn by `n`: different `n`, unrelated text (no near duplicates by accident)."""
    return " ".join(random.Random(n).choices(VOCABULARY, k=length)) + "."


def seed_of(body: dict[str, Any]) -> str:
    match = _SEED.search(body["messages"][-1]["content"])
    return match.group(1) if match else "a custom prompt"


def diverse(counter: Iterator[int] | None = None) -> Any:
    """A pairs factory whose every pair is new: an instruction and a response nobody else has."""
    numbers = counter or itertools.count(1)

    def pairs(body: dict[str, Any], count: int) -> list[dict[str, str]]:
        topic = seed_of(body)
        out = []
        for _ in range(count):
            n = next(numbers)
            out.append({"instruction": f"Question {n} like: {topic}", "response": prose(n)})
        return out

    return pairs


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as scripted:
        yield scripted


@pytest.fixture
def server(shared_server: ScriptedLLM) -> ScriptedLLM:
    # One server per module (starting one costs ~0.2 s); every test starts from its initial state.
    shared_server.reset()
    shared_server.pairs_factory = diverse()
    return shared_server


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
    screen = arguments.pop("screen", None)
    if screen is None:
        screen = PairScreen.for_spec(test, arguments["synthesis"])
        screen.index_existing(existing)
    async with make_service_llm(server, store, temperature=0.9) as llm:
        return await synthesize(train, llm, screen, **arguments)


def zeros(**counts: int) -> dict[str, int]:
    return {reason: counts.get(reason, 0) for reason in REASONS}


# ---- generation ---------------------------------------------------------------------------------------------


async def test_new_rows_are_kept_with_seed_category(server: ScriptedLLM, store: LocalStore) -> None:
    progress: list[tuple[int, int]] = []
    outcome = await run(server, store, on_progress=lambda kept, total: progress.append((kept, total)))
    assert len(outcome.rows) == outcome.kept == 10
    assert outcome.calls == 3 and len(server.requests) == 3
    assert outcome.removed == zeros()
    assert all(row.origin == "synthetic" for row in outcome.rows)
    assert len({normalize(row.prompt) for row in outcome.rows}) == 10
    by_seed = {row.prompt: row.category for row in seeds()}
    for row in outcome.rows:
        assert row.category == by_seed[row.prompt.split(" like: ", 1)[1]]
    assert progress[-1] == (10, 10)
    assert outcome.spend.calls == 3 and outcome.spend.completion_tokens > 0
    body = server.requests[0]
    schema = body["response_format"]["json_schema"]
    assert schema["name"] == "synthetic_pairs"
    assert schema["schema"]["properties"]["pairs"]["maxItems"] == 4
    assert body["temperature"] == 0.9
    # The paper's prompt: one seed pair per call, a JSON list of new pairs similar in context and structure.
    prompt = body["messages"][-1]["content"]
    assert "Generate 4 new (instruction, response) pairs that are similar in context and structure" in prompt
    assert "<example_response>" in prompt and '{"pairs": [' in prompt


async def test_seeds_are_balanced_across_categories(server: ScriptedLLM, store: LocalStore) -> None:
    train = [
        *(
            make_row(f"Convert {n} km to miles.", f"{n} km is {n * 0.62:.2f} miles.", category="distance")
            for n in range(6)
        ),
        *(
            make_row(f"Convert {n} kg to pounds.", f"{n} kg is {n * 2.2:.1f} pounds.", category="mass")
            for n in range(2)
        ),
        make_row("Convert 2 litres to gallons.", "2 litres is about 0.53 US gallons.", category="volume"),
    ]
    outcome = await run(server, store, seeds=train, synthesis=SynthesisSpec(pairs_per_call=1), new_rows=12)
    assert outcome.calls == 12
    shown = [seed_of(body) for body in server.requests]
    category = {row.prompt: row.category for row in train}
    assert Counter(category[s] for s in shown) == {"distance": 4, "mass": 4, "volume": 4}
    # Without replacement within a category: 4 of the 6 distance seeds, each once; both mass seeds twice.
    distance = [s for s in shown if category[s] == "distance"]
    assert len(set(distance)) == 4
    assert Counter(s for s in shown if category[s] == "mass") == {
        "Convert 0 kg to pounds.": 2,
        "Convert 1 kg to pounds.": 2,
    }


async def test_seeds_drawn_without_replacement_and_reproducibly(server: ScriptedLLM, store: LocalStore) -> None:
    outcome = await run(server, store, new_rows=24)  # 6 calls over 3 seeds of 3 categories
    assert outcome.calls == 6
    used = sorted(seed_of(body) for body in server.requests)
    assert Counter(used) == Counter({row.prompt: 2 for row in seeds()})


async def test_a_prompt_template_is_rendered_per_task(server: ScriptedLLM, store: LocalStore) -> None:
    template = "Task: {task}\nQ: {instruction}\nA: {response}\nWrite {pairs} more.{focus} Braces: {{}}"
    outcome = await run(server, store, seeds=seeds()[:1], synthesis=SynthesisSpec(prompt_template=template), new_rows=4)
    assert outcome.kept == 4
    (body,) = server.requests
    assert body["messages"][-1]["content"] == (
        "Task: unit conversion. Convert between metric and imperial units.\nThe category of the example is: distance"
        "\nQ: Convert 5 km to miles.\nA: 5 km is about 3.11 miles.\nWrite 4 more. Braces: {}"
    )


def test_templates_are_validated_naming_unknown_placeholders() -> None:
    validate_template(DEFAULT_TEMPLATE)
    validate_template("{task} {instruction} {response} {pairs} {focus}")
    with pytest.raises(TemplateError, match=r"unknown placeholders \{topic\}, \{0\}; the known ones are \{task\}"):
        validate_template("{task} {topic} {0} {topic}")
    with pytest.raises(TemplateError, match=r'\{"pairs": \[\]\}.*literal braces'):
        validate_template('Reply as {"pairs": []}')
    with pytest.raises(TemplateError, match=r"\{task\.name\}, \{instruction!r\}"):
        validate_template("{task.name} {instruction!r}")
    with pytest.raises(TemplateError, match="not a valid template"):
        validate_template("unclosed {task")


def test_focus_has_its_own_paragraph_in_the_default_prompt() -> None:
    (_, user) = synthesis_messages(TASK, seeds()[0], 3, focus="Watch the decimals.")
    assert (
        "different from the others. The responses must be accurate and complete.\n\nWatch the decimals.\n\n"
        in (user["content"])
    )
    (_, plain) = synthesis_messages(TASK, seeds()[0], 3)
    assert "complete.\n\nReply with this JSON" in plain["content"]


# ---- filters ------------------------------------------------------------------------------------------------


def test_truncation_and_refusal_heuristics() -> None:
    assert not is_truncated("Use (F - 32) * 5/9. He is 5'11\" tall.", "x.")
    assert is_truncated("Use the formula (F - 32", None)
    assert is_truncated('He said "convert it', None)
    assert is_truncated("```python\nprint(1)\n", None)
    assert is_truncated("Ten pounds is about 4.5 kilogr", "A full sentence.")
    assert not is_truncated("Ten pounds is about 4.5 kilograms", "No full stop at the end")
    assert not is_truncated('It is "4.5 kg."', "Done.")
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert is_refusal("As an AI language model, I do not have opinions.")
    assert not is_refusal("Sorry for the wait: 5 km is about 3.11 miles.")
    # A task that teaches the model to decline keeps its refusals.
    assert quality_problem("Share the password.", "I'm sorry, but I can't share it.", "x.", 100) == "refusal"
    assert (
        quality_problem("Share the password.", "I'm sorry, but I can't share it.", "I am sorry, but I cannot.", 100)
        is None
    )


async def test_each_filter_reason_is_counted(server: ScriptedLLM, store: LocalStore) -> None:
    existing_long = prose(9001, 40)
    existing = [*seeds(), make_row("Describe the metric system.", existing_long, category="distance")]
    overlap = f"{prose(9002, 20)[:-1]} and {LONG_TEST_REFERENCE[:-1].lower()} as the key idea {prose(9003, 20)}"
    crafted = [
        ("   ", "No instruction here."),  # empty
        ("Convert 3 yards to metres.", ""),  # empty
        ("Convert 4 yards to metres.", "Use the factor (0.9144 to get metres."),  # truncated: bracket
        ("Convert 5 yards to metres.", "Five yards is about 4.57 metr"),  # truncated: mid-word
        ("Convert 6 yards to metres.", "I'm sorry, but I can't help with unit conversions."),  # refusal
        ("Convert 7 yards to metres.", "As an AI language model, I think 7 yards is 6.4 metres."),  # refusal
        ("Convert 8 yards to metres.", "x" * 9000 + "."),  # too_long
        ("Convert 9 yards to metres.", overlap),  # test_ngram_overlap
        ("convert 100 F to celsius!", "About 37.8 C."),  # test_near_duplicate: a short test prompt
        ("Convert 5 km to miles", "Roughly 3.1 miles."),  # exact_duplicate: a train instruction
        ("Describe kilometres.", "5 km is about 3.11 miles."),  # exact_duplicate: a train response
        ("Describe the metric system briefly.", existing_long[:-1] + " indeed."),  # near_duplicate of existing
        ("Convert 10 yards to metres.", "Ten yards is about 9.14 metres."),  # kept
    ]
    server.pairs_factory = lambda body, count: [{"instruction": i, "response": r} for i, r in crafted]
    outcome = await run(
        server, store, seeds=seeds()[:1], existing=existing, synthesis=SynthesisSpec(pairs_per_call=13), new_rows=1
    )
    assert [(row.prompt, row.reference) for row in outcome.rows] == [crafted[-1]]
    assert outcome.removed == zeros(
        empty=2,
        truncated=2,
        refusal=2,
        too_long=1,
        test_ngram_overlap=1,
        test_near_duplicate=1,
        exact_duplicate=2,
        near_duplicate=1,
    )


async def test_one_survivor_per_duplicate_cluster(server: ScriptedLLM, store: LocalStore) -> None:
    old, first, second = prose(1001, 40), prose(1002, 40), prose(1003, 40)
    existing = [*seeds(), make_row("An older question.", old, category="distance")]
    numbers = itertools.count(1)

    def pairs(body: dict[str, Any], count: int) -> list[dict[str, str]]:
        # Every call returns the same clusters (with fresh instructions): later calls repeat earlier ones.
        responses = [first, first[:-1] + " again.", old[:-1] + " too.", second, second, old]
        return [{"instruction": f"Question number {next(numbers)}?", "response": r} for r in responses]

    server.pairs_factory = pairs
    outcome = await run(
        server,
        store,
        seeds=seeds()[:1],
        existing=existing,
        synthesis=SynthesisSpec(pairs_per_call=6, max_calls_per_round=3),
        new_rows=10,
    )
    assert outcome.calls == 3
    assert [row.reference for row in outcome.rows] == [first, second]
    # Call 1: first kept, its near copy and old's near copy dropped, second kept, its repeat and old exact.
    # Calls 2 and 3: first, second (twice) and old exact, the two near copies near.
    assert outcome.removed == zeros(near_duplicate=2 + 2 * 2, exact_duplicate=2 + 2 * 4)


async def test_call_cap_stops_a_generator_that_only_repeats(server: ScriptedLLM, store: LocalStore) -> None:
    server.pairs_factory = lambda body, count: [{"instruction": "Convert 5 km to miles.", "response": "Again."}]
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


# ---- the test split -----------------------------------------------------------------------------------------


async def test_no_test_row_ever_reaches_the_generator(server: ScriptedLLM, store: LocalStore) -> None:
    repeated = make_row("Convert 3 feet to metres.", "3 feet is about 0.91 metres.", category="distance")
    overlapping = make_row(
        "Explain the Fahrenheit to Celsius conversion.",
        f"First, {LONG_TEST_REFERENCE[:-1].lower()} in total.",
        category="temperature",
    )
    outcome = await run(server, store, seeds=[*seeds(), repeated, overlapping], new_rows=24)
    assert outcome.seeds_excluded == 2
    sent = server.prompts_text()
    for row in held_out():
        assert row.prompt not in sent and row.reference not in sent
    assert "thirty two from one hundred" not in sent


async def test_a_prompt_carrying_test_text_is_never_sent(server: ScriptedLLM, store: LocalStore) -> None:
    template = f"{{task}}: like {{instruction}} / {{response}}. Never answer: {LONG_TEST_PROMPT}"
    synthesis = SynthesisSpec(prompt_template=template, max_calls_per_round=3)
    outcome = await run(server, store, synthesis=synthesis, new_rows=8)
    assert server.requests == []
    assert outcome.withheld == 3 and outcome.calls == 0 and outcome.kept == 0


async def test_only_contaminated_seeds_is_an_error(server: ScriptedLLM, store: LocalStore) -> None:
    with pytest.raises(ValueError, match="train seeds"):
        await run(server, store, seeds=held_out())
    assert server.requests == []


# ---- targeting ----------------------------------------------------------------------------------------------


def judged(index: int, score: float, reason: str = "", repeat: int = 0) -> Judgment:
    return Judgment(
        index=index,
        response_index=0,
        repeat=repeat,
        judge_model="judge",
        similarity=score,
        precision=score,
        reason=reason,
    )


def targeting_test_rows() -> list[ChatRow]:
    return [
        make_row("How far is 8 km in miles?", "About 4.97 miles.", category="distance"),
        make_row("How heavy is 3 kg in pounds?", "About 6.61 pounds.", category="mass"),
        make_row("How much is 4 litres in gallons?", "About one gallon.", category="volume"),
        make_row(LONG_TEST_PROMPT, LONG_TEST_REFERENCE, category="temperature"),
    ]


def test_category_scores_and_weights_favour_the_weak_but_cover_all() -> None:
    rows = targeting_test_rows()
    judgments = [judged(0, 90), judged(0, 80, repeat=1), judged(1, 20), judged(2, 90), judged(9, 1)]
    judgments.append(Judgment(index=2, response_index=0, repeat=1, judge_model="judge", error="no score"))
    scores = category_scores(judgments, rows)
    assert scores == {"distance": 85.0, "mass": 20.0, "volume": 90.0}
    weights = seed_weights(scores, ["distance", "mass", "volume", None])
    assert weights["mass"] > weights["distance"] > weights["volume"] > 0
    # A category without judgments counts as the mean of the others: neither favoured nor starved.
    assert weights[None] == pytest.approx(0.25 / 4 + 0.75 * (100 - 65) / (15 + 80 + 10 + 35))
    assert sum(weights.values()) == pytest.approx(1.0)
    assert seed_weights({}, ["a", "b"]) == {"a": 0.5, "b": 0.5}


def test_focus_never_carries_test_text() -> None:
    rows = targeting_test_rows()
    screen = PairScreen.for_spec(rows, SynthesisSpec())
    judgments = [
        judged(3, 10, f"The reference says: {LONG_TEST_REFERENCE} The answer forgot to subtract first."),
        judged(3, 15, f"Asked '{LONG_TEST_PROMPT}', it answered something else."),
        judged(1, 20, "It quoted About 6.61 pounds."),  # a short reference (4 tokens): scrubbed
        judged(1, 30, "Rounded too early; keep two decimals."),
        judged(2, 40, "It should say about one gallon."),  # shorter than any n-gram: dropped whole
        judged(2, 50, "Say 'US gallons' explicitly."),
        judged(0, 95, "Fine."),  # a passing score: nothing worth quoting
    ]
    targeting = build_targeting(judgments, rows, ["mass", "temperature", "distance", "volume", None], screen.guard)
    text = "\n".join([*targeting.focus.values(), targeting.default_focus])
    assert "- It quoted […].\n- Rounded too early; keep two decimals.\n" in targeting.focus["mass"]
    assert "- The reference says: […]. The answer forgot to subtract first.\n" in targeting.focus["temperature"]
    assert "- Asked '[…]', it answered something else.\n" in targeting.focus["temperature"]
    assert "mean score in this category is 12/100" in targeting.focus["temperature"]
    assert targeting.focus["volume"].count("\n- ") == 1 and "US gallons" in targeting.focus["volume"]
    assert targeting.focus["distance"] == ""
    # Seeds of a category the judge never saw get the notes on the weakest answers overall.
    assert targeting.focus_for(None) == targeting.default_focus and "- The reference says: […]" in (
        targeting.default_focus
    )
    assert targeting.reasons_dropped == 1 and targeting.reasons_used == 5
    assert "6.61" not in text and "one gallon" not in text and "Fahrenheit" not in text
    assert not screen.guard.leaks(text)


async def test_targeted_sampling_favours_a_low_scoring_category(server: ScriptedLLM, store: LocalStore) -> None:
    targeting = Targeting(scores={}, weights={"distance": 0.1, "mass": 0.8, "volume": 0.1})
    outcome = await run(server, store, synthesis=SynthesisSpec(pairs_per_call=1), new_rows=20, targeting=targeting)
    category = {row.prompt: row.category for row in seeds()}
    shown = Counter(category[seed_of(body)] for body in server.requests)
    assert outcome.calls == 20
    assert shown == {"mass": 16, "distance": 2, "volume": 2}


# ---- cache and resume ---------------------------------------------------------------------------------------


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


async def test_a_round_resumed_from_a_checkpoint_ends_with_the_same_rows(
    server: ScriptedLLM, store: LocalStore
) -> None:
    parts: list[tuple[list[ChatRow], Checkpoint]] = []

    async def sink(rows: list[ChatRow], checkpoint: Checkpoint) -> None:
        parts.append((list(rows), checkpoint))

    def repeats(body: dict[str, Any], count: int) -> list[dict[str, str]]:
        n = next(numbers)
        # Every third pair repeats an earlier response: resuming must drop the same ones.
        return [{"instruction": f"Q{n}-{k}?", "response": prose(n if k % 3 else 1)} for k in range(count)]

    numbers = itertools.count(1)
    server.pairs_factory = repeats
    arguments: dict[str, Any] = {"synthesis": SynthesisSpec(pairs_per_call=3), "new_rows": 14, "part_rows": 4}
    whole = await run(server, store, sink=sink, max_wave=2, **arguments)
    assert whole.rows == [] and len(parts) >= 3
    rows = [row for part, _ in parts for row in part]
    assert len(rows) == whole.kept == 14 and sum(whole.removed.values()) > 0
    sent = len(server.requests)
    # Resume after the first part: the screen knows the training set and that part's rows.
    screen = PairScreen.for_spec(held_out(), arguments["synthesis"])
    screen.index_existing([*seeds(), *parts[0][0]])
    rest: list[tuple[list[ChatRow], Checkpoint]] = []

    async def rest_sink(rows: list[ChatRow], checkpoint: Checkpoint) -> None:
        rest.append((list(rows), checkpoint))

    resumed = await run(server, store, sink=rest_sink, max_wave=2, screen=screen, resume=parts[0][1], **arguments)
    assert len(server.requests) == sent  # every later call answered from the cache
    assert parts[0][0] + [row for part, _ in rest for row in part] == rows
    assert resumed.removed == whole.removed and resumed.calls == whole.calls
    assert resumed.spend.usd == pytest.approx(whole.spend.usd) and resumed.spend.calls == whole.spend.calls
