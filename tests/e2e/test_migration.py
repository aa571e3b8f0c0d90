"""Whole migrations on the real bus: nats-server, the five services as separate processes (exactly as
`llamaduo up` runs them), the directory store, a tiny random model and a scripted service LLM."""

import asyncio
import json
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest

from llamaduo.client import Client, load_spec
from llamaduo.contract import Event, MigrationGraduated, MigrationRequested, decode
from llamaduo.data import parse_jsonl, read_manifest
from llamaduo.embedded.stack import Stack, StackConfig
from llamaduo.settings import WorkerSettings
from llamaduo.store import open_store, path_from_file_uri
from tests.support.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "commit-message" / "spec.yaml"


@pytest.fixture(scope="module")
def scripted_llm():
    with ScriptedLLM(judge_score=70) as llm:
        yield llm


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, scripted_llm):
    state = tmp_path_factory.mktemp("stack")
    config = StackConfig(
        state_dir=state,
        service_llm_base_url=scripted_llm.base_url,
        service_llm_model=scripted_llm.model,
        extra_env={"LLAMADUO_RETRY_BASE_DELAY_S": "0.2", "LLAMADUO_LOG_LEVEL": "INFO"},
    )
    with Stack(config) as running:
        yield running
    for log in sorted((state / "logs").glob("*.log")):
        print(f"--- {log.name} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-15:]))


def tiny_spec(tiny_model_dir: Path, **overrides):
    spec = load_spec(EXAMPLE)
    update = {
        "base_model": spec.base_model.model_copy(update={"id": str(tiny_model_dir)}),
        # A high learning rate: three steps must visibly change a random model's answers.
        "training": spec.training.model_copy(
            update={"epochs": 1, "max_steps": 3, "batch_size": 8, "learning_rate": 5e-2, "validation_fraction": 0.1}
        ),
        "inference": spec.inference.model_copy(update={"responses_per_prompt": 2, "max_new_tokens": 8}),
        "synthesis": spec.synthesis.model_copy(update={"first_round_rows": 6}),
    }
    update.update(overrides)
    return spec.model_copy(update=update)


def settings_of(stack: Stack) -> WorkerSettings:
    return WorkerSettings(nats_url=stack.nats_url, store_url=stack.store_url)


async def run_migration(stack: Stack, spec, migration_id: str) -> tuple[list[Event], object]:
    settings = settings_of(stack)
    async with Client(settings, settings) as client:
        since = datetime.now(UTC)
        await client.submit(spec, migration_id)
        events = [event async for event in client.follow(migration_id, since, idle_timeout=300)]
        return events, await client.status(migration_id)


def names(events: list[Event]) -> list[str]:
    return [f"{e.name}@{getattr(e, 'iteration', '-')}" for e in events if e.name != "progress"]


def thresholds(spec, value: float):
    return spec.evaluation.model_copy(update={"thresholds": {"similarity": value, "precision": value}})


async def test_a_migration_graduates_with_an_adapter_that_loads(stack, tiny_model_dir, scripted_llm):
    spec = tiny_spec(tiny_model_dir)
    spec = spec.model_copy(update={"evaluation": thresholds(spec, 60)})
    events, state = await run_migration(stack, spec, "e2e-graduates")
    assert names(events) == [
        "migration.requested@-",
        "dataset.ready@0",
        "model.trained@0",
        "responses.ready@0",
        "evaluation.completed@0",
        "migration.graduated@0",
    ]
    assert any(e.name == "progress" for e in events), "workers report progress"
    graduated = events[-1]
    assert isinstance(graduated, MigrationGraduated)
    assert graduated.scores["similarity"].mean == 70
    assert state.status == "graduated"
    assert state.spend.calls == 16 * 2  # 16 test prompts x 2 responses x 1 repeat, each charged once
    store = open_store(settings_of(stack))
    adapter_tar = path_from_file_uri(graduated.adapter.uri)
    assert store.read_bytes(graduated.adapter)  # the sha256 in the event matches the stored bytes
    with tarfile.open(adapter_tar) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
    # The test split never trained on: no test prompt in the iteration-0 training data.
    manifest = read_manifest(store, state.iterations[0].dataset)
    train_prompts = {row.prompt for shard in manifest.shards for row in parse_jsonl(store.read_bytes(shard.ref), "x")}
    test_prompts = {row.prompt for row in parse_jsonl(store.read_bytes(state.test), "t")}
    assert len(test_prompts) == 16 and not train_prompts & test_prompts


async def test_an_app_switches_to_the_graduated_adapter_by_changing_base_url_and_model(stack, tiny_model_dir, tmp_path):
    """After the graduation above: the openai client, pointed at `llamaduo serve`, gets the adapter's answers."""
    import openai

    from llamaduo.cli.adapters import materialise_adapters
    from llamaduo.localmodel import load_tokenizer
    from llamaduo_inferencer.generation import generate_chats, load_with_adapter
    from llamaduo_inferencer.serve.app import create_app
    from llamaduo_inferencer.serve.engine import ChatEngine
    from tests.support.live_server import serve_in_thread

    settings = settings_of(stack)
    async with Client(settings, settings) as client:
        state = await client.status("e2e-graduates")
    assert state is not None and state.status == "graduated"
    adapter = state.best().adapter
    adapters = materialise_adapters([f"e2e-graduates={adapter.uri}"], tmp_path / "adapters")
    messages = [{"role": "user", "content": "Write a commit message for: fixed the login button on Safari"}]
    local = load_with_adapter(tiny_model_dir, adapters["e2e-graduates"], "cpu")
    expected = generate_chats(
        local,
        load_tokenizer(tiny_model_dir),
        [messages],
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=12,
        seed=None,
        batch_size=1,
    )[0][0].text
    engine = ChatEngine.load(str(tiny_model_dir), adapters=adapters, model_cache=tmp_path / "cache", device="cpu")

    def ask() -> tuple[list[str], str, str]:
        with serve_in_thread(create_app(engine)) as url:
            app_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")  # the only two changes an app makes
            served = [m.id for m in app_client.models.list().data]
            reply = app_client.chat.completions.create(
                model="e2e-graduates", messages=messages, temperature=0, max_tokens=12
            )
            stream = app_client.chat.completions.create(
                model="e2e-graduates", messages=messages, temperature=0, max_tokens=12, stream=True
            )
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            return served, reply.choices[0].message.content or "", streamed

    served, answer, streamed = await asyncio.to_thread(ask)
    assert "e2e-graduates" in served
    assert answer == expected and streamed == expected


async def test_the_graduated_adapter_loads_with_plain_peft_in_a_fresh_process_and_changes_answers(
    stack, tiny_model_dir
):
    """After the graduation above: nothing of llamaduo is needed to use the adapter."""
    import subprocess
    import sys

    settings = settings_of(stack)
    async with Client(settings, settings) as client:
        state = await client.status("e2e-graduates")
    assert state is not None and state.best() is not None
    archive = path_from_file_uri(state.best().adapter.uri)
    script = """
import json, sys, tarfile, tempfile
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir, archive = sys.argv[1], sys.argv[2]
folder = tempfile.mkdtemp()
tarfile.open(archive).extractall(folder, filter="data")
tokenizer = AutoTokenizer.from_pretrained(folder)
prompts = ["Write a commit message for: fixed the login button", "Summarize: added a retry to the uploader"]
def answers(model):
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        torch.manual_seed(0)  # the same draws for both models: only the adapter differs
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:]))
    return out
def logits(model):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        return model(**ids).logits[0, -1]
base = AutoModelForCausalLM.from_pretrained(base_dir)
plain, plain_logits = answers(base), logits(base)
tuned_model = PeftModel.from_pretrained(base, folder)
tuned, tuned_logits = answers(tuned_model), logits(tuned_model)
shift = float((tuned_logits - plain_logits).abs().max())
print(json.dumps({"plain": plain, "tuned": tuned, "shift": shift}))
"""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script, str(tiny_model_dir), str(archive)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    # A random tiny model answers almost the same text whatever it is asked, so "changes the answers" is measured
    # where it shows: the next-token distribution of the adapted model differs from the base model's.
    assert answers["shift"] > 1e-3, answers


async def test_a_migration_that_never_clears_the_bar_fails_at_its_iteration_limit(stack, tiny_model_dir, scripted_llm):
    spec = tiny_spec(tiny_model_dir)
    spec = spec.model_copy(update={"evaluation": thresholds(spec, 95)})
    before = len(scripted_llm.requests)
    events, state = await run_migration(stack, spec, "e2e-iteration-limit")
    assert names(events) == [
        "migration.requested@-",
        "dataset.ready@0",
        "model.trained@0",
        "responses.ready@0",
        "evaluation.completed@0",
        "migration.need_more_data@0",
        "dataset.ready@1",
        "model.trained@1",
        "responses.ready@1",
        "evaluation.completed@1",
        "migration.failed@1",
    ]
    failed = events[-1]
    assert failed.reason == "budget:iterations"
    assert failed.best_adapter is not None, "the best adapter so far is still published"
    grown = next(e for e in events if e.name == "dataset.ready" and e.iteration == 1)
    assert grown.synthetic_rows >= 6 and grown.train_rows == events[1].train_rows + grown.synthetic_rows
    assert state.status == "failed" and [r.decision for r in state.iterations] == ["need_more_data", "failed"]
    # Decontamination: no test prompt ever reached the service LLM in a synthesis request.
    store = open_store(settings_of(stack))
    test_prompts = [row.prompt for row in parse_jsonl(store.read_bytes(state.test), "t")]
    synthesis_requests = [
        json.dumps(r)
        for r in scripted_llm.requests[before:]
        if "synthetic_pairs" in json.dumps(r.get("response_format"))
    ]
    assert synthesis_requests
    assert not any(prompt in request for prompt in test_prompts for request in synthesis_requests)


async def test_the_report_and_lineage_of_a_finished_run(stack, tmp_path):
    """Runs after the iteration-limit migration above: its report's figures carry the state's numbers."""
    from llamaduo.report import Lineage, build_lineage, write_report_files
    from llamaduo.report.data import build_report_data
    from llamaduo.report.figures import dataset_series, metric_series, spend_series

    settings = settings_of(stack)
    async with Client(settings, settings) as client:
        state = await client.status("e2e-iteration-limit")
    assert state is not None and state.status == "failed"
    store = open_store(settings)
    paths = write_report_files(state, store, tmp_path / "report")
    page = paths[0].read_text()
    assert paths[0].name == "report.html" and len(paths) >= 4
    assert all(path.stat().st_size > 0 for path in paths)
    assert "e2e-iteration-limit" in page and "budget:iterations" in page and "llamaduo serve" in page
    report = build_report_data(state, store, gpu_usd_per_hour=2.0)
    similarity = next(series for series in metric_series(report) if series.metric == "similarity")
    assert similarity.iterations == [0, 1]
    assert similarity.means == [record.scores["similarity"].mean for record in state.iterations]
    assert similarity.threshold == 95
    sizes = dataset_series(report)
    assert [c + s for c, s in zip(sizes.coverage, sizes.synthetic, strict=True)] == [
        record.train_rows for record in state.iterations
    ]
    assert spend_series(report).cumulative[-1] == pytest.approx(state.spend.usd)
    # The coordinator stored each decided iteration's lineage: the adapter links to its dataset's shards.
    for record in state.iterations:
        stored = store.head(f"migrations/e2e-iteration-limit/iter-{record.iteration:04d}/lineage/lineage.json")
        assert stored is not None
        lineage = Lineage.model_validate_json(store.read_bytes(stored))
        assert lineage.decision == record.decision
        assert lineage.training is not None and lineage.training.adapter == record.adapter
        manifest = read_manifest(store, record.dataset)
        assert lineage.dataset.shards is not None
        assert [shard.sha256 for shard in lineage.dataset.shards] == [shard.ref.sha256 for shard in manifest.shards]
        assert (lineage.synthesis is not None) == (record.iteration > 0)
        assert build_lineage(store, state, record.iteration).decision == record.decision


async def test_a_duplicate_request_does_nothing(stack, tiny_model_dir):
    spec = tiny_spec(tiny_model_dir)
    spec = spec.model_copy(update={"evaluation": thresholds(spec, 60)})
    events, _ = await run_migration(stack, spec, "e2e-duplicate")
    assert events[-1].name == "migration.graduated"
    settings = settings_of(stack)
    async with Client(settings, settings) as client:
        from llamaduo.bus import Publisher

        # Same migration id, a new message id: JetStream's dedup cannot catch it, the coordinator must.
        again = MigrationRequested(migration_id="e2e-duplicate", spec=events[0].spec)
        await Publisher(client.js, "test", settings).publish(again, ce_id="e2e-duplicate:again")
        await asyncio.sleep(4)
        nc = await nats.connect(stack.nats_url)
        sub = await nc.jetstream().subscribe("llamaduo.v1.dataset.ready", ordered_consumer=True)
        seen = []
        try:
            while True:
                msg = await sub.next_msg(timeout=1)
                if msg.headers.get("ce-subject") == "e2e-duplicate":
                    seen.append(json.loads(msg.data)["iteration"])
        except nats.errors.TimeoutError:
            pass
        await nc.close()
        assert seen == [0]
        assert (await client.status("e2e-duplicate")).status == "graduated"


async def test_a_cancelled_migration_resumes_without_redoing_finished_stages(stack, tiny_model_dir):
    import uuid

    from llamaduo.bus import Publisher
    from llamaduo.contract import MigrationResume, ModelTrained

    spec = tiny_spec(tiny_model_dir)
    spec = spec.model_copy(update={"evaluation": thresholds(spec, 60)})
    settings = settings_of(stack)
    async with Client(settings, settings) as client:
        since = datetime.now(UTC)
        await client.submit(spec, "e2e-resume")
        trained = None
        async for event in client.follow("e2e-resume", since, idle_timeout=300):
            if isinstance(event, ModelTrained):
                trained = event
                await client.cancel("e2e-resume", "pause after training")
            if event.name == "migration.failed":
                break
        assert trained is not None
        assert (await client.status("e2e-resume")).status == "cancelled"
        resumed_at = datetime.now(UTC)
        await Publisher(client.js, "test", settings).publish(
            MigrationResume(migration_id="e2e-resume", request_id=uuid.uuid4().hex)
        )
        after: list[Event] = []
        # From shortly before the resume: the cancellation's failure may come first, so go past terminal events.
        async for event in client.follow("e2e-resume", resumed_at, idle_timeout=300, stop_at_terminal=False):
            if event.name != "progress":
                after.append(event)
            if event.name == "migration.graduated":
                break
        state = await client.status("e2e-resume")
    assert after[-1].name == "migration.graduated" and state.status == "graduated"
    again = [e for e in after if isinstance(e, ModelTrained) and e.spec.resumed == 1]
    # The trainer found its adapter stored and emitted it again: the same bytes, not a second training run.
    assert len(again) == 1 and again[0].adapter == trained.adapter
    trainer_log = (stack.logs_dir / "trainer.log").read_text()
    assert trainer_log.count("adapter already trained; re-emitting") >= 1


async def test_malformed_events_are_dead_lettered_and_the_services_keep_serving(stack, tiny_model_dir):
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    await js.publish("llamaduo.v1.model.trained", b"{not json", headers={"Nats-Msg-Id": "e2e-garbage-1"})
    bad = {"migration_id": "e2e-poisoned", "iteration": 0, "schema_version": 1}
    await js.publish("llamaduo.v1.dataset.ready", json.dumps(bad).encode(), headers={"Nats-Msg-Id": "e2e-garbage-2"})
    spec = tiny_spec(tiny_model_dir)
    spec = spec.model_copy(update={"evaluation": thresholds(spec, 60)})
    events, _ = await run_migration(stack, spec, "e2e-after-poison")
    assert events[-1].name == "migration.graduated"
    sub = await js.subscribe("llamaduo.v1.deadletter.>", ordered_consumer=True)
    dead = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            msg = await sub.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            break
        dead.add((msg.headers["llamaduo-dlq-event-id"], msg.subject, msg.headers["llamaduo-dlq-reason"]))
    await nc.close()
    # Every consumer of the subject parks it: dataset.ready is read by the trainer and the coordinator.
    assert dead == {
        ("e2e-garbage-1", "llamaduo.v1.deadletter.inferencer", "invalid_json"),
        ("e2e-garbage-2", "llamaduo.v1.deadletter.trainer", "schema_violation"),
        ("e2e-garbage-2", "llamaduo.v1.deadletter.coordinator", "schema_violation"),
    }
    settings = settings_of(stack)
    async with Client(settings, settings) as client:
        poisoned = await client.status("e2e-poisoned")
    # No state exists for a migration nobody requested; the poison is parked, not applied.
    assert poisoned is None


def test_decoding_every_event_in_the_stream_succeeds(stack):
    async def check() -> int:
        nc = await nats.connect(stack.nats_url)
        sub = await nc.jetstream().subscribe("llamaduo.v1.>", stream="LLAMADUO_EVENTS", ordered_consumer=True)
        count = 0
        from llamaduo.contract import EVENTS_BY_NAME

        try:
            while True:
                msg = await sub.next_msg(timeout=1)
                name = msg.subject.removeprefix("llamaduo.v1.")
                if msg.headers.get("Nats-Msg-Id", "").startswith("e2e-garbage"):
                    continue
                decode(msg.data, EVENTS_BY_NAME[name], msg.headers)
                assert {"ce-id", "ce-source", "ce-type", "ce-specversion", "ce-time"} <= set(msg.headers)
                count += 1
        except nats.errors.TimeoutError:
            pass
        await nc.close()
        return count

    assert asyncio.run(check()) > 20
