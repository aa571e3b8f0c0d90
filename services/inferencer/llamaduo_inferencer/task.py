"""One inference task: model.trained in, responses artifact and responses.ready out (idempotent, resumable).

Answers are stored as they finish, in parts of a few prompts (`responses-part-<fingerprint>-NNNNN.jsonl`); a
redelivered task reads the parts of the same adapter and settings (the fingerprint) and answers only the prompts
they lack. `inference.json` records the measured throughput; `responses.jsonl`, every prompt in test-split order,
is written last, and a task that finds it re-emits.

The answers come from the spec's `inference.backend`: base + adapter run here with transformers (continuous
batching), or a TGI or OpenAI-compatible server that serves the adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from llamaduo.bus import TaskContext, TaskError
from llamaduo.contract import ArtifactRef, Event, ModelTrained, ResponsesReady
from llamaduo.contract.spec import InferenceSpec
from llamaduo.data import JSONL_MEDIA_TYPE, ChatRow, conversation, read_rows
from llamaduo.data.results import PromptResponses, Response, dump_models, load_models
from llamaduo.localmodel import load_tokenizer, resolve_base_model
from llamaduo.store import ArtifactStore
from llamaduo.store.archive import unpack_dir
from llamaduo.store.outputs import StageOutputs
from llamaduo_inferencer.backends import BackendError, RemoteBackend, Sampling
from llamaduo_inferencer.backends.common import gather_or_cancel
from llamaduo_inferencer.backends.openai_compat import OpenAICompatibleBackend
from llamaduo_inferencer.backends.tgi import TGIBackend
from llamaduo_inferencer.batching import PromptTooLongError, answer_chats, row_seed
from llamaduo_inferencer.generation import AdapterMismatchError, Completion, Message, load_with_adapter
from llamaduo_inferencer.settings import InferencerSettings

Report = Callable[[int, int | None], None]
INFERENCE_MEDIA_TYPE = "application/vnd.llamaduo.inference+json"


def prompt_responses(index: int, row: ChatRow, completions: Sequence[Completion]) -> PromptResponses:
    """The stored form of one prompt's answers."""
    return PromptResponses(
        index=index,
        prompt=row.prompt,
        responses=[
            Response(
                text=c.text,
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.completion_tokens,
                finish_reason=c.finish_reason,
                latency_s=c.latency_s,
            )
            for c in completions
        ],
    )


class ResponseParts:
    """Finished prompts stored in numbered parts as they complete; thread-safe."""

    def __init__(self, outputs: StageOutputs, fingerprint: str, part_prompts: int) -> None:
        self.outputs = outputs
        self.fingerprint = fingerprint
        self.part_prompts = part_prompts
        self.done: dict[int, PromptResponses] = {}
        self._pending: list[PromptResponses] = []
        self._next_part = 0
        self._lock = threading.Lock()

    def name(self, part: int) -> str:
        """The output name of part `part`."""
        return f"responses-part-{self.fingerprint}-{part:05d}.jsonl"

    def load(self) -> dict[int, PromptResponses]:
        """Read the stored parts (numbered from 0 until one is missing) and return the prompts they hold."""
        store = self.outputs.store
        while (ref := store.head(self.outputs.key(self.name(self._next_part)), JSONL_MEDIA_TYPE)) is not None:
            for item in load_models(store.read_bytes(ref), PromptResponses, ref.uri):
                self.done[item.index] = item
            self._next_part += 1
        return dict(self.done)

    def add(self, item: PromptResponses) -> None:
        """Record a finished prompt; a full part is stored at once."""
        with self._lock:
            self.done[item.index] = item
            self._pending.append(item)
            if len(self._pending) >= self.part_prompts:
                self._flush_locked()

    def flush(self) -> None:
        """Store the prompts not yet in a part."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        items = sorted(self._pending, key=lambda item: item.index)
        key = self.outputs.key(self.name(self._next_part))
        self.outputs.store.put_bytes(key, dump_models(items), JSONL_MEDIA_TYPE)
        self._pending = []
        self._next_part += 1


def fingerprint(event: ModelTrained) -> str:
    """What the stored parts depend on: the adapter, the test split and the inference settings."""
    material = "|".join([event.adapter.sha256, event.test.sha256, event.spec.inference.model_dump_json()])
    return hashlib.sha256(material.encode()).hexdigest()[:12]


class InferenceTask:
    """Answers every test prompt k times with base + adapter, resuming from stored parts, or re-emits the answers."""

    def __init__(self, settings: InferencerSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store

    async def __call__(self, event: ModelTrained, ctx: TaskContext) -> list[Event]:
        """Handle model.trained."""
        outputs = StageOutputs(self.store, event.migration_id, event.iteration, "responses")
        stored = await outputs.head("responses.jsonl", JSONL_MEDIA_TYPE)
        if stored is None:
            stored, prompts = await self._answer_all(event, outputs, ctx)
        else:
            ctx.log.info("responses already stored; re-emitting")
            prompts = len(await asyncio.to_thread(read_rows, self.store, event.test))
        return [
            ResponsesReady(
                migration_id=event.migration_id,
                iteration=event.iteration,
                spec=event.spec,
                adapter=event.adapter,
                dataset=event.dataset,
                test=event.test,
                responses=stored,
                prompts=prompts,
                responses_per_prompt=event.spec.inference.responses_per_prompt,
            )
        ]

    async def _answer_all(
        self, event: ModelTrained, outputs: StageOutputs, ctx: TaskContext
    ) -> tuple[ArtifactRef, int]:
        rows = await asyncio.to_thread(read_rows, self.store, event.test)
        parts = ResponseParts(outputs, fingerprint(event), self.settings.part_prompts)
        done = await asyncio.to_thread(parts.load)
        remaining = [index for index in range(len(rows)) if index not in done]
        if done:
            ctx.log.info("resuming from stored responses", extra={"answered": len(done), "remaining": len(remaining)})
        report = ctx.progress_reporter("inference")
        inference = event.spec.inference
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="inferencer-", dir=self.settings.work_dir))
        started = time.perf_counter()
        try:
            if remaining:
                adapter_dir = await asyncio.to_thread(self._unpack_adapter, event, work)
                started = time.perf_counter()
                if inference.backend == "transformers":
                    await asyncio.to_thread(self._answer_locally, event, adapter_dir, rows, remaining, parts, report)
                else:
                    await self._answer_remotely(event, adapter_dir, rows, remaining, parts, report)
                await asyncio.to_thread(parts.flush)
        except PromptTooLongError as error:
            raise TaskError("prompt_too_long", f"test {error}") from error
        except AdapterMismatchError as error:
            raise TaskError("adapter_mismatch", str(error)) from error
        except BackendError as error:
            raise TaskError(error.reason, str(error)) from error
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - started
        items = [parts.done[index] for index in range(len(rows))]
        generated = sum(r.completion_tokens for index in remaining for r in parts.done[index].responses)
        # What this delivery measured (a resumed task measures only what it generated): the report's throughput.
        await outputs.put_json(
            "inference.json",
            {
                "backend": inference.backend,
                "device": self.settings.device if inference.backend == "transformers" else str(inference.endpoint),
                "prompts": len(items),
                "prompts_generated": len(remaining),
                "responses_per_prompt": inference.responses_per_prompt,
                "completion_tokens_generated": generated,
                "seconds": round(seconds, 3),
                "completion_tokens_per_second": round(generated / seconds, 3) if seconds > 0 and generated else None,
            },
            INFERENCE_MEDIA_TYPE,
        )
        ref = await outputs.put("responses.jsonl", dump_models(items), JSONL_MEDIA_TYPE)
        return ref, len(items)

    def _unpack_adapter(self, event: ModelTrained, work: Path) -> Path:
        archive = self.store.download(event.adapter, work / "adapter.tar")
        return unpack_dir(archive, work / "adapter")

    def _tokenizer_dir(self, event: ModelTrained, adapter_dir: Path) -> Path | str:
        # The trainer saved the tokenizer (and chat template) it trained with beside the adapter.
        if (adapter_dir / "tokenizer_config.json").is_file():
            return adapter_dir
        return resolve_base_model(event.spec.base_model.id, self.settings.model_cache)

    def _answer_locally(
        self,
        event: ModelTrained,
        adapter_dir: Path,
        rows: list[ChatRow],
        remaining: list[int],
        parts: ResponseParts,
        report: Report,
    ) -> None:
        inference = event.spec.inference
        base = resolve_base_model(event.spec.base_model.id, self.settings.model_cache)
        try:
            model = load_with_adapter(
                base,
                adapter_dir,
                self.settings.device,
                merge=inference.merge_adapter,
                load_in_4bit=inference.quantization == "4bit",
            )
        except ValueError as error:
            if isinstance(error, AdapterMismatchError):
                raise
            raise TaskError("inference_unsupported", str(error)) from error
        tokenizer = load_tokenizer(self._tokenizer_dir(event, adapter_dir))
        total = len(rows)

        def finished(index: int, completions: list[Completion]) -> None:
            parts.add(prompt_responses(index, rows[index], completions))
            report(len(parts.done), total)

        answer_chats(
            model,
            tokenizer,
            [conversation(rows[index]) for index in remaining],
            n=inference.responses_per_prompt,
            temperature=inference.temperature,
            top_p=inference.top_p,
            max_new_tokens=inference.max_new_tokens,
            seed=inference.seed + event.iteration,
            batch_size=inference.batch_size,
            stop=inference.stop,
            on_prompt=finished,
            prompt_ids=remaining,
        )

    async def _answer_remotely(
        self,
        event: ModelTrained,
        adapter_dir: Path,
        rows: list[ChatRow],
        remaining: list[int],
        parts: ResponseParts,
        report: Report,
    ) -> None:
        inference = event.spec.inference
        adapter = inference.adapter_name_for(event.migration_id, event.iteration)
        backend = await asyncio.to_thread(self._remote_backend, event, adapter_dir)
        try:
            if isinstance(backend, OpenAICompatibleBackend) and inference.load_adapter_from is not None:
                server_path = await asyncio.to_thread(self._export_adapter, inference, event, adapter, adapter_dir)
                await backend.load_adapter(adapter, server_path)
            total = len(rows)
            seed = inference.seed + event.iteration

            async def answer(index: int) -> None:
                sampling = Sampling(
                    n=inference.responses_per_prompt,
                    temperature=inference.temperature,
                    top_p=inference.top_p,
                    max_new_tokens=inference.max_new_tokens,
                    stop=tuple(inference.stop),
                    seed=row_seed(seed, index, 0),
                )
                completions = await backend.answer(conversation(rows[index]), sampling, adapter)
                await asyncio.to_thread(parts.add, prompt_responses(index, rows[index], completions))
                report(len(parts.done), total)

            await gather_or_cancel([answer(index) for index in remaining])
        finally:
            await backend.aclose()

    def _remote_backend(self, event: ModelTrained, adapter_dir: Path) -> RemoteBackend:
        inference = event.spec.inference
        assert inference.endpoint is not None  # the spec requires it for remote backends
        endpoint = str(inference.endpoint)
        key = self.settings.inference_api_key.get_secret_value() if self.settings.inference_api_key else None
        if inference.backend == "tgi":
            tokenizer = load_tokenizer(self._tokenizer_dir(event, adapter_dir))

            def render(messages: Sequence[Message]) -> tuple[str, int]:
                text = str(
                    tokenizer.apply_chat_template(
                        [dict(message) for message in messages], tokenize=False, add_generation_prompt=True
                    )
                )
                return text, len(tokenizer(text, add_special_tokens=False)["input_ids"])

            return TGIBackend(
                endpoint,
                render,
                concurrency=inference.concurrency,
                timeout_s=inference.timeout_s,
                max_retries=inference.max_retries,
                api_key=key,
            )
        return OpenAICompatibleBackend(
            endpoint,
            inference.base_model_name or event.spec.base_model.id,
            api_key=key or "EMPTY",
            concurrency=inference.concurrency,
            timeout_s=inference.timeout_s,
            max_retries=inference.max_retries,
        )

    def _export_adapter(self, inference: InferenceSpec, event: ModelTrained, adapter: str, adapter_dir: Path) -> str:
        """Copy the adapter into the directory shared with the server; return its path as the server sees it."""
        export_root = self.settings.adapter_export_dir
        if export_root is None:
            raise TaskError(
                "inference_misconfigured",
                "inference.load_adapter_from is set but this inferencer has no LLAMADUO_ADAPTER_EXPORT_DIR (the "
                "directory it shares with the server)",
            )
        destination = export_root / adapter
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(adapter_dir, destination)
        assert inference.load_adapter_from is not None
        return inference.load_adapter_from.format(
            migration_id=event.migration_id, iteration=event.iteration, adapter_name=adapter
        )
