"""Process faults on the real stack: the five services as separate processes (two replicas of every worker), an
authenticated nats-server with file storage, the S3 endpoint and a scripted service LLM that answers 30% of calls
with 429, 500, a timeout, a malformed reply or a garbage body.

Short form (`make test`): one migration while the trainer, the inferencer and the judge are each SIGKILLed in the
middle of their task (after the replica logged "task started"; the judge while its service-LLM calls are in
flight), the coordinator is SIGKILLed and restarted during training and nats-server during judging. Full schedule
(`make chaos`) adds a two-iteration migration that also kills the synthesizer mid-synthesis, restarts nats-server
during training and the coordinator during judging, then ten migrations at once on the same stack while a trainer
and a judge replica are killed mid-task. Each must
graduate with every stage's output exactly once, nothing computed or paid twice, its ledger equal to what the
service LLM answered, and no secret in any log or artifact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.faults import kill9
from tests.chaos.stack_world import (
    ChaosStack,
    Secrets,
    audit,
    coverage_for,
    marker_of,
    record,
    spec_for,
    terminal_state,
)
from tests.chaos.tally import ScenarioTally
from tests.e2e.test_migration import tiny_spec
from tests.support.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(1200)]
LLM_FAULTS = ("429:0.05", "500", "timeout:3", "malformed", "garbage")
ONE_ITERATION = ["dataset.ready@0", "model.trained@0", "responses.ready@0", "evaluation.completed@0"]
TWO_ITERATIONS = [
    *ONE_ITERATION,
    "migration.need_more_data@0",
    "dataset.ready@1",
    "model.trained@1",
    "responses.ready@1",
    "evaluation.completed@1",
    "migration.graduated@1",
]


def is_synthesis(body: dict[str, Any]) -> bool:
    return "synthetic_pairs" in json.dumps(body.get("response_format"))


def is_judgment(body: dict[str, Any]) -> bool:
    return not is_synthesis(body)


def scores(llm: ScriptedLLM) -> Callable[[dict[str, Any]], int]:
    """For `chaos-kill2`: 50 until its synthesizer was answered, then 90 (iteration 0 misses the bar of 75 and
    iteration 1 clears it). Every other migration: 80."""

    def score(body: dict[str, Any]) -> int:
        mid = marker_of(body)
        if mid != "chaos-kill2":
            return 80
        return 90 if any(marker_of(b) == mid and is_synthesis(b) for b in llm.answered) else 50

    return score


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, tiny_model_dir: Path) -> Iterator[ChaosStack]:
    llm = ScriptedLLM(latency_s=0.3, fault_rate=0.3, fault_kinds=LLM_FAULTS, seed=8)
    llm.judge_score = scores(llm)
    with llm:
        stack = ChaosStack(tmp_path_factory.mktemp("chaos-stack"), s3_endpoint, llm, Secrets(), "chaos-stack")
        stack.store().ensure_bucket()
        stack.start()
        try:
            yield stack
        finally:
            stack.stop()
            for log in sorted(stack.logs_dir.glob("*.log")):
                print(f"--- {log.name} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-8:]))


async def wait(probe: Callable[[], Any], what: str, timeout: float = 600) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := probe()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def kill_in_task(
    chaos: ChaosStack,
    mid: str | list[str],
    service: str,
    iteration: int,
    calls_of: Callable[[dict[str, Any]], bool] | None = None,
) -> str:
    """SIGKILL the replica of `service` working on (mid, iteration) — the first of several `mid`s to start — in the
    middle of the task; returns the migration whose task it was."""
    mids = [mid] if isinstance(mid, str) else mid

    def running() -> tuple[str, Any] | None:
        return next(((m, hit) for m in mids if (hit := chaos.started(service, m, iteration))), None)

    victim, (child, ident) = await wait(running, f"{service}@{iteration} to start")
    if calls_of is not None:  # wait until its service-LLM calls are in flight
        await wait(
            lambda: any(marker_of(b) == victim and calls_of(b) for b in chaos.llm.requests),
            f"{service}'s first service-LLM call",
        )
    chaos.kill_and_replace(child, f"kill -9 {service}")
    assert not chaos.finished_by(child, ident), f"the {service} kill came after the task finished"
    return victim


def restart_coordinator(chaos: ChaosStack) -> None:
    coordinator = chaos.children("coordinator")[0]
    assert coordinator.process is not None
    kill9(coordinator.process)
    chaos.kills["kill -9 coordinator + restart"] += 1
    coordinator.start()


async def submit(chaos: ChaosStack, mid: str, threshold: float, tiny_model_dir: Path) -> None:
    async with chaos.client() as client:
        await client.submit(spec_for(tiny_spec(tiny_model_dir), coverage_for(chaos, mid), threshold), mid)


async def finish_and_audit(
    chaos: ChaosStack, scenario: ScenarioTally, expected: dict[str, list[str]], faults_before: dict[str, int]
) -> None:
    """Wait for every migration in `expected` to end, then audit and assert the invariants."""
    states = dict(
        zip(
            expected,
            await asyncio.gather(*(terminal_state(chaos, mid, 1100) for mid in expected)),
            strict=True,
        )
    )
    for kind, count in chaos.llm.fault_counts.items():
        scenario.fault(f"LLM {kind}", count - faults_before.get(kind, 0))
    scenario.migrations_completed += sum(1 for s in states.values() if s.status == "graduated")
    problems = {mid: (s.status, s.failure_reason, s.failure_detail) for mid, s in states.items()}
    assert all(s.status == "graduated" for s in states.values()), problems
    result = await audit(chaos, states, expected)
    record(scenario, result)
    assert result.events_lost == 0, result.notes
    assert result.duplicate_events == 0, "each stage's output exactly once per (migration, iteration)"
    assert result.computed_twice == 0, "a task finished by one replica is never computed again"
    assert result.paid_twice == 0, result.notes
    for mid, state in states.items():
        assert state.spend.calls > 0
        assert state.spend.calls == sum(1 for b in chaos.llm.answered if marker_of(b) == mid), mid
    assert result.foreign_refs == [], "no artifact of one migration is read by another"
    assert result.leaked == [], result.leaked


def faults_now(chaos: ChaosStack) -> dict[str, int]:
    return dict(chaos.llm.fault_counts)


def count_kills(chaos: ChaosStack, scenario: ScenarioTally, before: dict[str, int], restarts_before: int) -> None:
    for what, count in chaos.kills.items():
        scenario.fault(what, count - before.get(what, 0))
    scenario.fault("kill -9 nats-server + restart", chaos.nats.restarts - restarts_before)


async def test_short_schedule_kill_every_model_worker_and_restart_the_coordinator_and_the_bus(
    chaos: ChaosStack, tiny_model_dir: Path, scenario: ScenarioTally
) -> None:
    scenario.name = "kill -9 workers, restart coordinator + nats, 30% LLM faults"
    mid, faults, kills = "chaos-kill1", faults_now(chaos), dict(chaos.kills)
    await submit(chaos, mid, 75, tiny_model_dir)
    scenario.migrations_started += 1
    await kill_in_task(chaos, mid, "trainer", 0)
    restart_coordinator(chaos)  # while the other trainer replica trains: it must decide later from stored state
    await kill_in_task(chaos, mid, "inferencer", 0)
    await kill_in_task(chaos, mid, "judge", 0, is_judgment)
    chaos.nats.restart(kill=True)  # while the judge's task waits to be redelivered
    count_kills(chaos, scenario, kills, 0)
    await finish_and_audit(chaos, scenario, {mid: [*ONE_ITERATION, "migration.graduated@0"]}, faults)


@pytest.mark.full_schedule
async def test_full_schedule_two_iterations_with_the_synthesizer_killed_and_restarts_mid_stage(
    chaos: ChaosStack, tiny_model_dir: Path, scenario: ScenarioTally
) -> None:
    scenario.name = "2 iterations: kill -9 every worker, restarts mid-stage"
    mid, faults, kills, restarts = "chaos-kill2", faults_now(chaos), dict(chaos.kills), chaos.nats.restarts
    await submit(chaos, mid, 75, tiny_model_dir)
    scenario.migrations_started += 1
    await kill_in_task(chaos, mid, "trainer", 0)
    await kill_in_task(chaos, mid, "inferencer", 0)
    await kill_in_task(chaos, mid, "judge", 0, is_judgment)
    await kill_in_task(chaos, mid, "synthesizer", 0, is_synthesis)
    await wait(lambda: chaos.started("trainer", mid, 1), "trainer@1 to start")
    chaos.nats.restart(kill=True)
    await wait(lambda: chaos.started("judge", mid, 1), "judge@1 to start")
    restart_coordinator(chaos)
    count_kills(chaos, scenario, kills, restarts)
    await finish_and_audit(chaos, scenario, {mid: TWO_ITERATIONS}, faults)


@pytest.mark.full_schedule
async def test_full_schedule_ten_concurrent_migrations_with_two_replicas_of_every_worker(
    chaos: ChaosStack, tiny_model_dir: Path, scenario: ScenarioTally
) -> None:
    scenario.name = "load: 10 concurrent migrations, 2 replicas each"
    faults, kills = faults_now(chaos), dict(chaos.kills)
    ids = [f"chaos-load-{n:02d}" for n in range(10)]
    for mid in ids:
        await submit(chaos, mid, 60, tiny_model_dir)
    scenario.migrations_started += len(ids)
    # Under load, a trainer and a judge replica die in the middle of whichever migration's task they hold.
    await kill_in_task(chaos, ids, "trainer", 0)
    await kill_in_task(chaos, ids, "judge", 0, is_judgment)
    count_kills(chaos, scenario, kills, chaos.nats.restarts)
    await finish_and_audit(chaos, scenario, {mid: [*ONE_ITERATION, "migration.graduated@0"] for mid in ids}, faults)
