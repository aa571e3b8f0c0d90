"""Duplicates: the same event published twice inside JetStream's dedup window, again after the window, and once more
under a new message id (a redelivered task whose output exists): the work is done once, the service LLM is asked
once per judgment, and the migration's ledger charges each call once. Real nats-server with a 1 s dedup window."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llamaduo.embedded.nats_server import NatsServer
from llamaduo.store import LocalStore
from tests.chaos.tally import ScenarioTally
from tests.chaos.world import PROMPTS, RESPONSES, World, judge_spec, responses_event, wait_for, write_coverage
from tests.support.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.integration, pytest.mark.scenario("duplicates"), pytest.mark.timeout(300)]
WINDOW_S = 1.0


async def test_duplicates_are_processed_once_and_paid_once(tmp_path: Path, scenario: ScenarioTally) -> None:
    store = LocalStore(tmp_path / "store")
    spec = judge_spec(write_coverage(tmp_path / "coverage.jsonl", "dup"))
    with ScriptedLLM(judge_score=50) as llm, NatsServer(tmp_path / "nats") as server:
        url = store.root.as_uri()
        async with World(server.url, url, store, llm.base_url, llm.model, duplicate_window_s=WINDOW_S) as world:
            await world.start_judge()  # two judge replicas share the work
            await world.submit(spec, "dup-001")
            scenario.migrations_started += 1
            event = responses_event(store, "dup-001", spec)
            first = await world.publisher.publish(event)
            again = await world.publisher.publish(event)
            assert not first.duplicate and again.duplicate, "inside the window JetStream drops the copy"
            scenario.fault("duplicate inside the dedup window")

            async def decided():  # type: ignore[no-untyped-def]
                state = await world.state("dup-001")
                return state if state is not None and state.iterations and state.iterations[0].decision else None

            # The scores miss the bar: the coordinator asks for more data and the migration stays open (no
            # synthesizer runs here), so the late copies below reach the judge instead of being skipped.
            state = await wait_for(decided, "the coordinator's decision", 60)
            assert [r.decision for r in state.iterations] == ["need_more_data"]
            calls = len(llm.requests)
            assert calls == PROMPTS * RESPONSES
            assert state.spend.calls == len(llm.answered) == calls

            # After the window the same id is a new message; under a new id it is a deliberate redelivery. Either
            # way the judge finds its evaluation stored and re-emits it: no call, no charge, no second decision.
            await asyncio.sleep(WINDOW_S * 3)
            late = await world.publisher.publish(event)
            assert not late.duplicate, "after the window the copy reaches the stream"
            await world.publisher.publish(event, ce_id="dup-001:redelivered")
            scenario.fault("duplicate after the dedup window")
            scenario.fault("redelivered task whose output exists")

            async def reemitted() -> bool:
                # Both copies re-emit the evaluation under its deterministic id within a second of each other, so
                # the stream holds it once more (not twice more).
                return len(await world.events("llamaduo.v1.evaluation.completed")) >= 2

            await wait_for(reemitted, "the stored evaluation to be re-emitted", 60)
            await wait_for(lambda: _consumed(world, "judge"), "the judge to take both copies", 60)
            await wait_for(lambda: _consumed(world, "coordinator-evaluated"), "the coordinator to read them", 60)
            after = await world.state("dup-001")
            assert after is not None
            assert len(llm.requests) == calls, "no service-LLM call was made for a duplicate"
            assert after.spend.calls == calls and after.spend.usd == pytest.approx(state.spend.usd)
            assert [r.decision for r in after.iterations] == ["need_more_data"]
            assert after.iterations[0].decision_published
            # A decision is published once: the state records that JetStream accepted it, so the evaluation copies
            # arriving past the dedup window do not put a second `need_more_data` on the stream (which would start
            # a second synthesis while the first may still run).
            decisions = await world.events("llamaduo.v1.migration.need_more_data")
            assert len(decisions) == 1, "one decision on the stream"
            scenario.work_done_twice += len(llm.requests) - calls + len(decisions) - 1
            scenario.migrations_completed += 1


async def _consumed(world: World, durable: str) -> bool:
    """Whether the durable consumer has nothing pending or unacknowledged."""
    info = await world.js.consumer_info("LLAMADUO_EVENTS", durable)
    return info.num_pending == 0 and info.num_ack_pending == 0
