"""Every service-LLM call is paid once: a judge replica dies mid-evaluation, another finishes it from the cache,
and the evaluation's ledger counts each call exactly once (real nats-server, real HTTP service LLM)."""

import asyncio
import contextlib

import nats
import pytest

from llamaduo.bus import Binding, Publisher, build_app, provision_bus
from llamaduo.contract import EvaluationCompleted, MigrationSpec, ResponsesReady, decode
from llamaduo.embedded.nats_server import NatsServer
from llamaduo.llm import ServiceLLMSettings
from llamaduo.store import LocalStore
from llamaduo_judge.settings import JudgeSettings
from llamaduo_judge.task import JudgingTask
from tests.support.migration_artifacts import stored_responses_event
from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.integration
PROMPTS, RESPONSES = 6, 2
JUDGMENTS = PROMPTS * RESPONSES


@pytest.fixture
def world(tmp_path):
    with NatsServer(tmp_path / "nats") as server, ScriptedLLM(judge_score=80, latency_s=0.25) as llm:
        yield server, llm, tmp_path


def responses_event(store: LocalStore) -> ResponsesReady:
    spec = MigrationSpec.model_validate(
        {
            "task": {"name": "commit-message"},
            "coverage": {"uri": "unused"},
            "evaluation": {"judge": {"input_usd_per_million": 1000.0, "output_usd_per_million": 2000.0}},
        }
    )
    return stored_responses_event(store, "ledger-001", spec, prompts=PROMPTS, responses=RESPONSES)


@contextlib.asynccontextmanager
async def judge_replica(settings: JudgeSettings, store: LocalStore):
    _, broker = build_app(
        "judge", settings, [Binding("judge", "judging", ResponsesReady, JudgingTask(settings, store))]
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def test_a_redelivered_evaluation_pays_each_call_once(world):
    server, llm, tmp_path = world
    store = LocalStore(tmp_path / "store")
    settings = JudgeSettings(
        nats_url=server.url,
        ack_wait_s=30,
        graceful_timeout_s=0.2,
        service_llm=ServiceLLMSettings(base_url=llm.base_url, model=llm.model, max_concurrency=2),
    )
    await provision_bus(settings)
    event = responses_event(store)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    completed = await js.subscribe("llamaduo.v1.evaluation.completed", ordered_consumer=True)
    async with judge_replica(settings, store) as first:
        await Publisher(js, "test", settings).publish(event)
        while len(llm.requests) < 4:  # noqa: ASYNC110 - the server runs in another thread
            await asyncio.sleep(0.05)
        await first.stop()  # the replica goes away mid-evaluation; its task is handed back unacked
    paid_before = len(llm.requests)
    assert paid_before < JUDGMENTS
    async with judge_replica(settings, store):
        msg = await completed.next_msg(timeout=60)
    evaluation = decode(msg.data, EvaluationCompleted)
    # Every answered call was cached and never asked again; only calls still in flight when the replica went
    # away (at most max_concurrency) had no reply to cache and were asked once more.
    prompts = [str(r["messages"]) for r in llm.requests]
    assert len(set(prompts)) == JUDGMENTS
    assert len(prompts) <= JUDGMENTS + 2
    # The ledger charges each judgment exactly once, whichever replica paid for it.
    assert evaluation.spend.calls == JUDGMENTS
    assert evaluation.spend.cached_calls >= paid_before - 2
    per_call = evaluation.spend.usd / JUDGMENTS
    assert per_call > 0 and evaluation.spend.usd == pytest.approx(JUDGMENTS * per_call)
    # A deliberate re-run (a new message id) re-emits the stored evaluation and makes no call at all.
    async with judge_replica(settings, store):
        await Publisher(js, "test", settings).publish(event, ce_id="ledger-001:rerun")
        await asyncio.sleep(2)
    assert len(llm.requests) == len(prompts)
    await nc.close()
