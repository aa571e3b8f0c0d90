"""One inference task: model.trained in, responses artifact and responses.ready out (idempotent by key)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llamaduo.bus import TaskContext
from llamaduo.contract import ArtifactRef, Event, ModelTrained, ResponsesReady
from llamaduo.data import JSONL_MEDIA_TYPE, conversation, read_rows
from llamaduo.data.results import PromptResponses, Response, dump_models
from llamaduo.localmodel import load_tokenizer, resolve_base_model
from llamaduo.store import ArtifactStore
from llamaduo.store.archive import unpack_dir
from llamaduo.store.outputs import StageOutputs
from llamaduo_inferencer.generation import generate_chats, load_with_adapter
from llamaduo_inferencer.settings import InferencerSettings


class InferenceTask:
    """Answers every test prompt k times with base + adapter, or re-emits the stored answers."""

    def __init__(self, settings: InferencerSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store

    async def __call__(self, event: ModelTrained, ctx: TaskContext) -> list[Event]:
        """Handle model.trained."""
        outputs = StageOutputs(self.store, event.migration_id, event.iteration, "responses")
        stored = await outputs.head("responses.jsonl", JSONL_MEDIA_TYPE)
        if stored is None:
            report = ctx.progress_reporter("inference")
            responses, prompts = await asyncio.to_thread(self._answer, event, outputs.key("responses.jsonl"), report)
        else:
            ctx.log.info("responses already stored; re-emitting")
            responses, prompts = stored, len(read_rows(self.store, event.test))
        return [
            ResponsesReady(
                migration_id=event.migration_id,
                iteration=event.iteration,
                spec=event.spec,
                adapter=event.adapter,
                dataset=event.dataset,
                test=event.test,
                responses=responses,
                prompts=prompts,
                responses_per_prompt=event.spec.inference.responses_per_prompt,
            )
        ]

    def _answer(
        self, event: ModelTrained, key: str, report: Callable[[int, int | None], None]
    ) -> tuple[ArtifactRef, int]:
        test_rows = read_rows(self.store, event.test)
        base = resolve_base_model(event.spec.base_model.id, self.settings.model_cache)
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="inferencer-", dir=self.settings.work_dir))
        try:
            archive = self.store.download(event.adapter, work / "adapter.tar")
            adapter_dir = unpack_dir(archive, work / "adapter")
            model = load_with_adapter(base, adapter_dir, self.settings.device)
            # The trainer saved the tokenizer (and chat template) it trained with beside the adapter.
            tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base)
            inference = event.spec.inference
            answers = generate_chats(
                model,
                tokenizer,
                [conversation(row) for row in test_rows],
                n=inference.responses_per_prompt,
                temperature=inference.temperature,
                top_p=inference.top_p,
                max_new_tokens=inference.max_new_tokens,
                seed=inference.seed + event.iteration,
                batch_size=inference.batch_size,
                on_batch=report,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        items = [
            PromptResponses(
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
            for index, (row, completions) in enumerate(zip(test_rows, answers, strict=True))
        ]
        return self.store.put_bytes(key, dump_models(items), JSONL_MEDIA_TYPE), len(items)
