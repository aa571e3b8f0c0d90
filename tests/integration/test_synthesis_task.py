"""The synthesis task end to end without the bus: a real `LocalStore`, the scripted service LLM over HTTP and a
stand-in for the task context. Streaming parts, the manifest, resuming an interrupted round, targeting, and the
guarantee that no n-gram of the test split ever reaches the service LLM."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import DatasetReady, MigrationSpec, NeedMoreData
from llamaduo.contract.spec import BudgetSpec, ServiceLLMSpec
from llamaduo.data import (
    JSONL_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    ChatRow,
    DatasetManifest,
    Shard,
    dump_jsonl,
    make_row,
    read_manifest,
    read_training_rows,
)
from llamaduo.data.results import Judgment, dump_models
from llamaduo.llm import ServiceLLMSettings, SpendCap
from llamaduo.store import LocalStore, artifact_key
from llamaduo.telemetry import get_logger
from llamaduo_synthesizer.dedup import words
from llamaduo_synthesizer.settings import SynthesizerSettings
from llamaduo_synthesizer.synthesis import REASONS
from llamaduo_synthesizer.task import SynthesisTask, part_keys
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.integration
MIGRATION = "synth-task-001"
_SEED = re.compile(r"<example_instruction>\s*(.*?)\s*</example_instruction>", re.DOTALL)
VOCABULARY = [f"{stem}{n}" for stem in ("alpha", "bravo", "delta", "kilo", "lima", "oscar", "tango") for n in range(40)]
TEST_ROWS = [
    (
        "distance",
        "Explain how many miles a runner covers in a marathon of forty two kilometres and show every step",
        "Divide forty two by one point six zero nine to get about twenty six point one miles for the whole race.",
    ),
    (
        "mass",
        "A parcel weighs seven kilograms and the courier charges per pound so how many pounds should the label show",
        "Multiply seven by two point two zero five to get about fifteen point four pounds and round up to sixteen.",
    ),
    (
        "volume",
        "How many litres of water does a bathtub that holds sixty US gallons contain when it is completely full",
        "Multiply sixty by three point seven eight five to get about two hundred twenty seven litres of water.",
    ),
]


class Interrupted(Exception):
    """Stands for a worker dying mid-round."""


class Context:
    """The parts of `TaskContext` the synthesis task uses: a logger and a progress reporter."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.log = get_logger("tests.synthesis_task")
        self.progress: list[tuple[str, int, int | None]] = []
        self.interrupt_after = interrupt_after

    spent_usd = 0.0
    """What the migration's ledger holds before this task (the coordinator's state)."""

    async def spend_cap(self, max_cost_usd: float | None) -> SpendCap | None:
        return SpendCap.for_migration(max_cost_usd, self.spent_usd)

    def progress_reporter(self, stage: str, min_interval_s: float = 1.0) -> Callable[[int, int | None], None]:
        def report(done: int, total: int | None) -> None:
            self.progress.append((stage, done, total))
            if self.interrupt_after is not None and len(self.progress) >= self.interrupt_after:
                raise Interrupted(f"stopped after {len(self.progress)} progress reports")

        return report


def ctx(context: Context) -> TaskContext:
    return cast(TaskContext, context)


def prose(n: int, length: int = 30) -> str:
    return " ".join(random.Random(n).choices(VOCABULARY, k=length)) + "."


def seed_of(body: dict[str, Any]) -> str:
    match = _SEED.search(body["messages"][-1]["content"])
    return match.group(1) if match else "a custom prompt"


def generator(repeat_every: int = 0) -> Callable[[dict[str, Any], int], list[dict[str, str]]]:
    """Fresh pairs like the seed; with `repeat_every`, every such pair repeats one response (for dedup to drop)."""
    numbers = itertools.count(1)

    def pairs(body: dict[str, Any], count: int) -> list[dict[str, str]]:
        topic = seed_of(body)
        out = []
        for _ in range(count):
            n = next(numbers)
            response = prose(0) if repeat_every and n % repeat_every == 0 else prose(n)
            out.append({"instruction": f"Question {n} like: {topic}", "response": response})
        return out

    return pairs


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


@pytest.fixture
def server(shared_server: ScriptedLLM) -> ScriptedLLM:
    shared_server.reset()
    shared_server.pairs_factory = generator()
    return shared_server


def settings_for(server: ScriptedLLM) -> SynthesizerSettings:
    return SynthesizerSettings(
        service_llm=ServiceLLMSettings(
            base_url=server.base_url,
            model="generator",
            max_retries=2,
            backoff_base_s=0.01,
            backoff_max_s=0.02,
            input_usd_per_million=1.0,
            output_usd_per_million=2.0,
        )
    )


def train_rows() -> list[ChatRow]:
    return [
        make_row("Convert 5 km to miles.", "5 km is about 3.11 miles.", category="distance", origin="coverage"),
        make_row("Convert 12 km to miles.", "12 km is about 7.46 miles.", category="distance", origin="coverage"),
        make_row("Convert 10 kg to pounds.", "10 kg is about 22.05 pounds.", category="mass", origin="coverage"),
        make_row("Convert 3 kg to pounds.", "3 kg is about 6.61 pounds.", category="mass", origin="coverage"),
        make_row(
            "Convert 2 litres to gallons.", "2 litres is about 0.53 US gallons.", category="volume", origin="coverage"
        ),
        make_row(
            "Convert 9 litres to gallons.", "9 litres is about 2.38 US gallons.", category="volume", origin="coverage"
        ),
    ]


def held_out_rows() -> list[ChatRow]:
    return [
        make_row(prompt, reference, category=category, origin="coverage") for category, prompt, reference in TEST_ROWS
    ]


def quoting_judgments() -> list[Judgment]:
    """Mass scored low, with reasons that quote the test prompt and reference; the others scored high."""
    judgments = []
    for index, (category, prompt, reference) in enumerate(TEST_ROWS):
        low = category == "mass"
        for response in range(2):
            score = 20 + 5 * response if low else 95
            reason = (
                f"For '{prompt}' the reference says {reference.upper()} but the answer forgot to round up."
                if low
                else "Correct and concise."
            )
            judgments.append(
                Judgment(
                    index=index,
                    response_index=response,
                    repeat=0,
                    judge_model="judge",
                    similarity=score,
                    precision=score,
                    reason=reason,
                )
            )
    return judgments


def event_for(
    store: LocalStore, *, new_rows: int = 20, train: list[ChatRow] | None = None, **synthesis: Any
) -> NeedMoreData:
    train = train or train_rows()
    train_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "train.jsonl"), dump_jsonl(train))
    test_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "test.jsonl"), dump_jsonl(held_out_rows()))
    manifest = DatasetManifest(
        migration_id=MIGRATION, iteration=0, shards=[Shard(ref=train_ref, rows=len(train), origin="coverage")]
    )
    manifest_ref = store.put_bytes(
        artifact_key(MIGRATION, 0, "dataset", "manifest.json"), manifest.model_dump_json().encode(), MANIFEST_MEDIA_TYPE
    )
    judgments_ref = store.put_bytes(
        artifact_key(MIGRATION, 0, "judgments", "judgments.jsonl"), dump_models(quoting_judgments()), JSONL_MEDIA_TYPE
    )
    spec = MigrationSpec.model_validate(
        {
            "task": {"name": "unit conversion", "description": "Convert between metric and imperial units."},
            "coverage": {"uri": "unused"},
            "synthesis": {"pairs_per_call": 4, "targeted": False, **synthesis},
        }
    )
    return NeedMoreData(
        migration_id=MIGRATION,
        iteration=0,
        spec=spec,
        dataset=manifest_ref,
        test=test_ref,
        judgments=judgments_ref,
        new_rows=new_rows,
        round_index=0,
    )


async def ready_of(task: SynthesisTask, event: NeedMoreData, context: Context) -> DatasetReady:
    (ready,) = await task(event, ctx(context))
    assert isinstance(ready, DatasetReady)
    return ready


def summary_of(store: LocalStore) -> dict[str, Any]:
    return cast(
        dict[str, Any], json.loads((store.root / artifact_key(MIGRATION, 1, "dataset", "synthesis.json")).read_bytes())
    )


def held_out_ngrams(n: int = 13) -> set[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for _, prompt, reference in TEST_ROWS:
        for text in (prompt, reference):
            tokens = words(text)
            grams.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


async def test_a_round_streams_parts_and_emits_dataset_ready(server: ScriptedLLM, store: LocalStore) -> None:
    task = SynthesisTask(settings_for(server), store, part_rows=4, max_wave=2)
    event = event_for(store, new_rows=20)
    context = Context()
    (ready,) = await task(event, ctx(context))
    assert isinstance(ready, DatasetReady)
    assert ready.iteration == 1 and ready.test == event.test
    assert ready.synthetic_rows == 20 and ready.train_rows == 6 + 20
    assert list(ready.removed) == list(REASONS) and ready.removed == dict.fromkeys(REASONS, 0)
    assert ready.spend.calls == len(server.requests) == 5 and ready.spend.usd > 0
    manifest = read_manifest(store, ready.dataset)
    assert manifest.shards[0] == read_manifest(store, event.dataset).shards[0]
    parts = manifest.shards[1:]
    # Waves of 2 calls x 4 pairs: a part after each wave (8, 8), the last one at the end of the round (4).
    assert [shard.rows for shard in parts] == [8, 8, 4]
    assert all(shard.origin == "synthetic" and shard.round_index == 0 for shard in parts)
    for number, shard in enumerate(parts):
        rows_key, record_key = part_keys(MIGRATION, 1, number)
        assert shard.ref.uri == store.uri_for(rows_key) and (store.root / record_key).is_file()
    rows = read_training_rows(store, manifest)  # every shard verified against its sha256
    synthetic = [row for row in rows if row.origin == "synthetic"]
    assert len(synthetic) == 20 and len({row.prompt for row in synthetic}) == 20
    assert context.progress[-1] == ("synthesis", 20, 20)
    summary = summary_of(store)
    assert summary["parts"] == 3 and summary["resumed_parts"] == 0 and summary["targeting"] is None

    # Redelivered after it finished: the same event again, nothing asked of the service LLM.
    (again,) = await task(event, ctx(Context()))
    assert again == ready and len(server.requests) == 5


async def test_an_interrupted_round_resumes_with_the_same_rows_and_no_repeated_call(
    server: ScriptedLLM, store: LocalStore
) -> None:
    server.pairs_factory = generator(repeat_every=5)  # duplicates to drop, before and after the interruption
    task = SynthesisTask(settings_for(server), store, part_rows=4, max_wave=2)
    event = event_for(store, new_rows=24)
    with pytest.raises(Interrupted):
        await task(event, ctx(Context(interrupt_after=2)))
    assert (store.root / part_keys(MIGRATION, 1, 1)[1]).is_file()
    assert not (store.root / part_keys(MIGRATION, 1, 2)[1]).exists()
    assert not (store.root / artifact_key(MIGRATION, 1, "dataset", "manifest.json")).exists()
    before = len(server.requests)
    assert before == 4

    ready = await ready_of(task, event, Context())
    summary = summary_of(store)
    assert summary["resumed_parts"] == 2
    # Each call reached the server once: the resumed task went on from the first call after the last part.
    assert len(server.requests) == summary["calls"] > before
    assert ready.synthetic_rows == 24 and ready.removed["exact_duplicate"] > 0
    resumed_rows = read_training_rows(store, read_manifest(store, ready.dataset))

    # The same round uninterrupted, its calls answered from the cache: the same rows, drops, calls and spend.
    shutil.rmtree(store.root / "migrations" / MIGRATION / "iter-0001")
    whole = await ready_of(task, event, Context())
    assert len(server.requests) == summary["calls"]
    assert read_training_rows(store, read_manifest(store, whole.dataset)) == resumed_rows
    assert whole.removed == ready.removed
    assert summary_of(store)["calls"] == summary["calls"] and summary_of(store)["resumed_parts"] == 0
    assert whole.spend.calls == ready.spend.calls and whole.spend.usd == pytest.approx(ready.spend.usd)


async def test_a_round_that_died_after_its_last_part_only_writes_the_manifest(
    server: ScriptedLLM, store: LocalStore
) -> None:
    task = SynthesisTask(settings_for(server), store, part_rows=4, max_wave=2)
    event = event_for(store, new_rows=20)
    with pytest.raises(Interrupted):
        await task(event, ctx(Context(interrupt_after=3)))  # the third report follows the third and last part
    sent = len(server.requests)
    # A damaged part is redone from the checkpoint before it, its calls answered from the cache.
    last = store.root / part_keys(MIGRATION, 1, 2)[0]
    last.write_text(last.read_text().replace("Question", "Answer"))
    ready = await ready_of(task, event, Context())
    assert ready.synthetic_rows == 20 and len(server.requests) == sent
    assert summary_of(store)["resumed_parts"] == 2 and summary_of(store)["parts"] == 3
    assert "Answer" not in last.read_text()


async def test_no_test_ngram_reaches_the_service_llm_even_when_judge_reasons_quote_it(
    server: ScriptedLLM, store: LocalStore
) -> None:
    # A train row that overlaps a test reference: it must never be shown as a seed.
    overlapping = make_row(
        "How should a courier label a seven kilogram parcel?",
        f"Well, {TEST_ROWS[1][2].lower()}",
        category="mass",
        origin="coverage",
    )
    task = SynthesisTask(settings_for(server), store, part_rows=8, max_wave=4)
    event = event_for(store, new_rows=24, train=[*train_rows(), overlapping], targeted=True)
    ready = await ready_of(task, event, Context())
    assert ready.synthetic_rows == 24
    summary = summary_of(store)
    assert summary["seeds_excluded"] == 1
    assert summary["targeting"]["reasons_used"] >= 1
    sent = [" ".join(m["content"] for m in body["messages"]) for body in server.requests]
    # The judge's notes did reach the prompts of the weak category, with the quoted test text cut out.
    assert any("forgot to round up" in text and "[…]" in text for text in sent)
    grams = held_out_ngrams(13)
    assert grams
    for text in sent:
        tokens = words(text)
        assert grams.isdisjoint(tuple(tokens[i : i + 13]) for i in range(len(tokens) - 12))
    assert overlapping.prompt not in "\n".join(sent)


async def test_a_targeted_round_favours_the_low_scoring_category(server: ScriptedLLM, store: LocalStore) -> None:
    task = SynthesisTask(settings_for(server), store)
    ready = await ready_of(task, event_for(store, new_rows=24, pairs_per_call=2, targeted=True), Context())
    assert ready.synthetic_rows == 24
    category = {row.prompt: row.category for row in train_rows()}
    shown = Counter(category[seed_of(body)] for body in server.requests)
    assert sum(shown.values()) == 12
    assert shown["mass"] >= 8 and shown["distance"] >= 1 and shown["volume"] >= 1
    weights = summary_of(store)["targeting"]["weights"]
    assert weights["mass"] > weights["distance"] == weights["volume"] > 0


def test_an_invalid_prompt_template_is_refused_with_the_request(store: LocalStore) -> None:
    # The spec refuses it, so `llamaduo migrate` fails before publishing and a foreign publisher's event is poison.
    with pytest.raises(ValueError) as info:
        event_for(store, prompt_template="Like {instruction} -> {response}, about {topic}")
    assert "{topic}" in str(info.value) and "{instruction}" in str(info.value)


async def test_a_round_whose_every_prompt_leaks_fails_without_calling(server: ScriptedLLM, store: LocalStore) -> None:
    template = "{task}: {instruction} / {response}. Not this one: " + TEST_ROWS[0][1]
    event = event_for(store, new_rows=8, prompt_template=template, max_calls_per_round=3)
    with pytest.raises(TaskError) as info:
        await SynthesisTask(settings_for(server), store)(event, ctx(Context()))
    assert info.value.reason == "no_synthetic_rows"
    assert "withheld for carrying test text: 3" in info.value.detail
    assert server.requests == []


async def test_the_dollar_cap_ends_a_round_with_the_rows_it_paid_for(
    server: ScriptedLLM, store: LocalStore, tmp_path: Path
) -> None:
    # One call's real cost, measured on a store of its own (so the capped run finds no cached reply).
    measured = LocalStore(tmp_path / "measured")
    uncapped = await ready_of(
        SynthesisTask(settings_for(server), measured, part_rows=4, max_wave=1), event_for(measured), Context()
    )
    per_call = uncapped.spend.usd / uncapped.spend.calls
    calls_before = len(server.requests)
    event = event_for(store, new_rows=20)
    worst = ServiceLLMSpec().max_tokens * 2.0 / 1e6  # output price 2 USD/M; the prompt adds little
    cap = 1.0 + 2 * per_call + worst
    event = event.model_copy(update={"spec": event.spec.model_copy(update={"budgets": BudgetSpec(max_cost_usd=cap)})})
    context = Context()
    context.spent_usd = 1.0
    ready = await ready_of(SynthesisTask(settings_for(server), store, part_rows=4, max_wave=1), event, context)
    assert ready.budget_exhausted
    assert 0 < ready.synthetic_rows < 20, "the rows paid for are kept"
    assert 1.0 + ready.spend.usd <= cap, "the ledger never passes the cap"
    sent = len(server.requests) - calls_before
    assert ready.spend.calls == sent == summary_of(store)["calls"]
    assert summary_of(store)["budget_exhausted"] is True
