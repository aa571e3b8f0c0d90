"""The inference task without the bus: a real `LocalStore`, a real adapter on the tiny model, and the scripted
TGI / OpenAI-compatible server over HTTP. Answers, resuming from stored parts, the idempotent re-emit, and the bad
inputs that must end in a clear reason (adapter for another base, prompt too long, unknown adapter, unreachable)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import llamaduo_inferencer.task as task_module
from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import MigrationSpec, ModelTrained, ResponsesReady
from llamaduo.data import ChatRow, dump_jsonl, make_row
from llamaduo.data.results import PromptResponses, Response, load_models
from llamaduo.localmodel import load_causal_lm, load_tokenizer
from llamaduo.store import LocalStore, artifact_key
from llamaduo.store.archive import pack_dir
from llamaduo.telemetry import get_logger
from llamaduo_inferencer.settings import InferencerSettings
from llamaduo_inferencer.task import InferenceTask, ResponseParts, fingerprint
from tests.support.scripted_tgi import ScriptedTGI

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("torch_single_thread")]
MIGRATION = "infer-task-001"
ADAPTER_NAME = f"{MIGRATION}-iter-0"
QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hello in French.", "What is the capital of Italy?", "Count to 3."]


class Context:
    """The parts of `TaskContext` the task uses: a logger and progress reporters."""

    def __init__(self) -> None:
        self.log = get_logger("tests.inference_task")
        self.progress: list[tuple[int, int | None]] = []

    def progress_reporter(self, stage: str, min_interval_s: float = 1.0) -> Callable[[int, int | None], None]:
        return lambda done, total: self.progress.append((done, total))


def make_adapter(base: torch.nn.Module, directory: Path, tokenizer_dir: Path | None) -> Path:
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(directory))  # type: ignore[arg-type]
    if tokenizer_dir is not None:
        load_tokenizer(tokenizer_dir).save_pretrained(str(directory))
    return directory


def event_for(
    store: LocalStore,
    base_model: Path,
    adapter_dir: Path,
    tmp_path: Path,
    inference: dict[str, Any] | None = None,
    questions: list[str] = QUESTIONS,
) -> ModelTrained:
    rows: list[ChatRow] = [make_row(q, "reference", origin="coverage") for q in questions]
    test_ref = store.put_bytes(artifact_key(MIGRATION, None, "coverage", "test.jsonl"), dump_jsonl(rows))
    archive = pack_dir(adapter_dir, tmp_path / f"{adapter_dir.name}.tar")
    adapter_ref = store.put_file(artifact_key(MIGRATION, 0, "adapter", "adapter.tar"), archive)
    spec = MigrationSpec.model_validate(
        {
            "task": {"name": "quiz"},
            "coverage": {"uri": "unused"},
            "base_model": {"id": str(base_model)},
            "inference": {"responses_per_prompt": 2, "max_new_tokens": 6, "batch_size": 3, "temperature": 0.8}
            | (inference or {}),
        }
    )
    return ModelTrained(
        migration_id=MIGRATION,
        iteration=0,
        spec=spec,
        adapter=adapter_ref,
        dataset=test_ref,
        test=test_ref,
        steps=1,
        train_seconds=1.0,
    )


@pytest.fixture
def settings(tmp_path: Path) -> InferencerSettings:
    return InferencerSettings(work_dir=tmp_path / "work", model_cache=tmp_path / "cache", device="cpu", part_prompts=2)


@pytest.fixture
def adapter_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return make_adapter(load_causal_lm(tiny_model_dir, "cpu"), tmp_path / "adapter", tiny_model_dir)


async def run(task: InferenceTask, event: ModelTrained, context: Context | None = None) -> ResponsesReady:
    events = await task(event, cast(TaskContext, context or Context()))
    assert len(events) == 1 and isinstance(events[0], ResponsesReady)
    return events[0]


def stored_answers(store: LocalStore, ready: ResponsesReady) -> list[PromptResponses]:
    return load_models(store.read_bytes(ready.responses), PromptResponses, ready.responses.uri)


async def test_answers_every_prompt_k_times_and_reemits_without_generating(
    store: LocalStore,
    settings: InferencerSettings,
    tiny_model_dir: Path,
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = event_for(store, tiny_model_dir, adapter_dir, tmp_path)
    context = Context()
    ready = await run(InferenceTask(settings, store), event, context)
    answers = stored_answers(store, ready)
    assert [a.index for a in answers] == list(range(len(QUESTIONS)))
    assert [a.prompt for a in answers] == QUESTIONS
    assert (ready.prompts, ready.responses_per_prompt) == (len(QUESTIONS), 2)
    for item in answers:
        assert len(item.responses) == 2
        assert all(0 < r.completion_tokens <= 6 and r.prompt_tokens > 0 for r in item.responses)
    assert context.progress[-1] == (len(QUESTIONS), len(QUESTIONS))

    def must_not_generate(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a stored answer was generated again")

    monkeypatch.setattr(task_module, "answer_chats", must_not_generate)
    again = await run(InferenceTask(settings, store), event)
    assert again.responses == ready.responses


async def test_a_redelivered_task_answers_only_the_prompts_its_stored_parts_lack(
    store: LocalStore,
    settings: InferencerSettings,
    tiny_model_dir: Path,
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = event_for(store, tiny_model_dir, adapter_dir, tmp_path)
    # A first delivery died after storing the part with prompts 0 and 3.
    parts = ResponseParts(
        task_module.StageOutputs(store, MIGRATION, 0, "responses"), fingerprint(event), part_prompts=2
    )
    earlier = [
        PromptResponses(
            index=index,
            prompt=QUESTIONS[index],
            responses=[
                Response(
                    text=f"stored {index}", prompt_tokens=9, completion_tokens=2, finish_reason="stop", latency_s=0.1
                )
            ]
            * 2,
        )
        for index in (0, 3)
    ]
    for item in earlier:
        parts.add(item)
    # A part of another adapter (another fingerprint) is not reused.
    stale = ResponseParts(task_module.StageOutputs(store, MIGRATION, 0, "responses"), "0" * 12, part_prompts=1)
    stale.add(earlier[0].model_copy(update={"index": 1}))

    generated_for: list[list[int]] = []
    real = task_module.answer_chats

    def spy(*args: Any, **kwargs: Any) -> Any:
        generated_for.append(list(kwargs["prompt_ids"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(task_module, "answer_chats", spy)
    ready = await run(InferenceTask(settings, store), event)
    assert generated_for == [[1, 2, 4]]
    answers = stored_answers(store, ready)
    assert [a.index for a in answers] == [0, 1, 2, 3, 4]
    assert answers[0] == earlier[0] and answers[3] == earlier[1]
    assert not answers[1].responses[0].text.startswith("stored")
    # The new answers were stored as parts too, after the earlier one: 2 prompts a part.
    names = sorted(p.name for p in (store.root / "migrations" / MIGRATION / "iter-0000" / "responses").iterdir())
    mine = [n for n in names if n.startswith(f"responses-part-{fingerprint(event)}")]
    assert len(mine) == 3


async def test_an_adapter_trained_for_another_base_fails_with_adapter_mismatch(
    store: LocalStore, settings: InferencerSettings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=49152,
        )
    )
    adapter = make_adapter(other, tmp_path / "other-adapter", tiny_model_dir)
    event = event_for(store, tiny_model_dir, adapter, tmp_path)
    with pytest.raises(TaskError) as failure:
        await run(InferenceTask(settings, store), event)
    assert failure.value.reason == "adapter_mismatch"
    assert "does not fit the base model" in failure.value.detail


async def test_a_prompt_longer_than_the_context_fails_with_prompt_too_long(
    store: LocalStore, settings: InferencerSettings, tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    event = event_for(store, tiny_model_dir, adapter_dir, tmp_path, questions=["short", "word " * 3000])
    with pytest.raises(TaskError) as failure:
        await run(InferenceTask(settings, store), event)
    assert failure.value.reason == "prompt_too_long"
    assert "prompt 1 has" in failure.value.detail and "context is 2048" in failure.value.detail


async def test_the_tgi_backend_answers_with_the_iterations_adapter(
    store: LocalStore, settings: InferencerSettings, tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    with ScriptedTGI(adapters={ADAPTER_NAME}, answer_tokens=5) as tgi:
        event = event_for(
            store, tiny_model_dir, adapter_dir, tmp_path, {"backend": "tgi", "endpoint": tgi.base_url, "seed": 3}
        )
        ready = await run(InferenceTask(settings, store), event)
        bodies = tgi.bodies
    answers = stored_answers(store, ready)
    assert len(answers) == len(QUESTIONS)
    assert all(len(item.responses) == 2 for item in answers)
    assert all(r.text.startswith(f"adapter={ADAPTER_NAME}") for item in answers for r in item.responses)
    assert {body["parameters"]["adapter_id"] for body in bodies} == {ADAPTER_NAME}
    # The prompt was rendered with the chat template saved beside the adapter (ChatML for the tiny model).
    assert all("<|im_start|>user" in body["inputs"] for body in bodies)
    assert len(bodies) == len(QUESTIONS) * 2


async def test_the_tgi_backend_fails_clearly_on_an_unknown_adapter_or_an_unreachable_server(
    store: LocalStore, settings: InferencerSettings, tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    with ScriptedTGI(adapters={"someone-else"}) as tgi:
        event = event_for(store, tiny_model_dir, adapter_dir, tmp_path, {"backend": "tgi", "endpoint": tgi.base_url})
        with pytest.raises(TaskError) as unknown:
            await run(InferenceTask(settings, store), event)
    assert unknown.value.reason == "tgi:unknown_adapter"
    assert ADAPTER_NAME in unknown.value.detail

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    event = event_for(
        store,
        tiny_model_dir,
        adapter_dir,
        tmp_path,
        {"backend": "tgi", "endpoint": f"http://127.0.0.1:{closed}", "max_retries": 1, "timeout_s": 2},
    )
    started = time.monotonic()
    with pytest.raises(TaskError) as unreachable:
        await run(InferenceTask(settings, store), event)
    assert unreachable.value.reason == "tgi:unreachable"
    assert f"127.0.0.1:{closed}" in unreachable.value.detail
    assert time.monotonic() - started < 30


async def test_the_openai_backend_loads_the_adapter_into_vllm_and_answers_by_its_name(
    store: LocalStore, tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    export = tmp_path / "shared-volume"
    export.mkdir()
    settings = InferencerSettings(
        work_dir=tmp_path / "work", model_cache=tmp_path / "cache", device="cpu", adapter_export_dir=export
    )
    server_path = f"/adapters/{ADAPTER_NAME}"
    with ScriptedTGI(loadable_paths={server_path}, answer_tokens=4) as vllm:
        event = event_for(
            store,
            tiny_model_dir,
            adapter_dir,
            tmp_path,
            {
                "backend": "openai",
                "endpoint": vllm.openai_url,
                "base_model_name": "scripted/base-model",
                "load_adapter_from": "/adapters/{adapter_name}",
            },
        )
        ready = await run(InferenceTask(settings, store), event)
        requests = vllm.requests
    assert (export / ADAPTER_NAME / "adapter_config.json").is_file(), "the adapter was put where the server reads it"
    loads = [r["body"] for r in requests if r["route"].endswith("load_lora_adapter")]
    assert loads == [{"lora_name": ADAPTER_NAME, "lora_path": server_path}]
    chats = [r["body"] for r in requests if r["route"].endswith("chat/completions")]
    assert {body["model"] for body in chats} == {ADAPTER_NAME}
    answers = stored_answers(store, ready)
    assert all(r.text.startswith(f"adapter={ADAPTER_NAME}") for item in answers for r in item.responses)
    assert all(r.completion_tokens == 4 for item in answers for r in item.responses)


def test_remote_backends_need_an_endpoint() -> None:
    with pytest.raises(ValueError, match="needs inference.endpoint"):
        MigrationSpec.model_validate({"task": {"name": "t"}, "coverage": {"uri": "u"}, "inference": {"backend": "tgi"}})
    with pytest.raises(ValueError, match="load_adapter_from is for the openai backend"):
        MigrationSpec.model_validate(
            {
                "task": {"name": "t"},
                "coverage": {"uri": "u"},
                "inference": {"backend": "tgi", "endpoint": "http://tgi:80", "load_adapter_from": "/a/{adapter_name}"},
            }
        )
