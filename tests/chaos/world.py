"""In-process worlds for the chaos tests: a private nats-server, the coordinator and a judge replica as FastStream
apps in this event loop, a directory or S3 store, the scripted service LLM; and readers of the stream and DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from llamaduo.bus import Binding, Publisher, build_app, provision_bus
from llamaduo.bus.provisioning import DEAD_LETTER_STREAM, EVENTS_STREAM
from llamaduo.client import Client
from llamaduo.contract import MigrationSpec, ResponsesReady
from llamaduo.llm import ServiceLLMSettings
from llamaduo.state import MigrationState
from llamaduo.store import ArtifactStore
from llamaduo_coordinator.app import create_app
from llamaduo_coordinator.settings import CoordinatorSettings
from llamaduo_judge.settings import JudgeSettings
from llamaduo_judge.task import JudgingTask
from tests.support.migration_artifacts import stored_responses_event

PROMPTS, RESPONSES = 4, 2


@dataclass(frozen=True)
class DeadLetter:
    """One parked message: which service parked it, why, and the id of the message it parked."""

    service: str
    event_id: str
    reason: str
    detail: str


def coverage_rows(marker: str, n: int = 24) -> list[dict[str, Any]]:
    """A coverage dataset whose every prompt carries `marker`, so service-LLM requests can be told apart."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"[{marker}] describe change number {i} in one line"},
                {"role": "assistant", "content": f"fix: change {i} of {marker}"},
            ]
        }
        for i in range(n)
    ]


def write_coverage(path: Path, marker: str, n: int = 24) -> Path:
    """Write `coverage_rows` as JSONL at `path`."""
    path.write_text("".join(json.dumps(row) + "\n" for row in coverage_rows(marker, n)))
    return path


def judge_spec(coverage: Path, **overrides: Any) -> MigrationSpec:
    """A small spec whose coverage is `coverage`."""
    raw: dict[str, Any] = {
        "task": {"name": "commit-message"},
        "coverage": {"uri": str(coverage), "test_fraction": 0.25},
        "evaluation": {"judge": {"input_usd_per_million": 1000.0, "output_usd_per_million": 2000.0}},
    }
    raw.update(overrides)
    return MigrationSpec.model_validate(raw)


def responses_event(store: ArtifactStore, migration_id: str, spec: MigrationSpec) -> ResponsesReady:
    """A valid responses.ready whose test split and responses are stored under `migration_id` (the test split not
    under the coordinator's own split key: it writes that one when the migration is accepted, and may do so later)."""
    return stored_responses_event(
        store,
        migration_id,
        spec,
        prompts=PROMPTS,
        responses=RESPONSES,
        prompt_prefix=f"[{migration_id}] ",
        split_stage="chaos-input",
    )


class World:
    """A private nats-server with the coordinator and one judge replica running in this event loop."""

    def __init__(
        self,
        nats_url: str,
        store_url: str,
        store: ArtifactStore,
        llm_url: str,
        llm_model: str,
        **store_settings: Any,
    ) -> None:
        self.store = store
        self.settings = JudgeSettings(
            nats_url=nats_url,
            store_url=store_url,
            **store_settings,
            ack_wait_s=10,
            retry_base_delay_s=0.1,
            graceful_timeout_s=1.0,
            service_llm=ServiceLLMSettings(
                base_url=llm_url, model=llm_model, max_concurrency=4, backoff_base_s=0.05, backoff_max_s=0.5
            ),
        )
        self.coordinator_settings = CoordinatorSettings(nats_url=nats_url, store_url=store_url, **store_settings)
        self.nc: NatsClient | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def js(self) -> JetStreamContext:
        """A JetStream context of the test's own connection."""
        assert self.nc is not None
        return self.nc.jetstream()

    @property
    def publisher(self) -> Publisher:
        """Publishes like a service does (PubAck, deterministic ids)."""
        return Publisher(self.js, "chaos-test", self.settings)

    async def __aenter__(self) -> World:
        await provision_bus(self.settings)
        self.nc = await nats.connect(self.settings.nats_url)
        coordinator = create_app(self.coordinator_settings)
        await coordinator.start()
        self._stack.push_async_callback(coordinator.stop)
        await self.start_judge()
        return self

    async def start_judge(self) -> None:
        """One more judge replica on the shared durable consumer."""
        _, broker = build_app(
            "judge",
            self.settings,
            [Binding("judge", "judging", ResponsesReady, JudgingTask(self.settings, self.store))],
        )
        await broker.start()
        self._stack.push_async_callback(broker.stop)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()
        if self.nc is not None:
            await self.nc.close()

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        """The user's client on this world."""
        async with Client(self.coordinator_settings, self.coordinator_settings) as client:
            yield client

    async def submit(self, spec: MigrationSpec, migration_id: str) -> None:
        """Submit a migration (the coordinator splits the coverage and stores the state)."""
        async with self.client() as client:
            await client.submit(spec, migration_id)
            await wait_for(lambda: client.status(migration_id), f"state of {migration_id}", 30)

    async def state(self, migration_id: str) -> MigrationState | None:
        """The migration's state in KV."""
        async with self.client() as client:
            return await client.status(migration_id)

    async def dead_letters(self, expected: int, timeout: float = 60) -> list[DeadLetter]:
        """Every dead letter so far, waiting until there are at least `expected` of them."""
        return await dead_letters(self.js, expected, timeout)

    async def events(self, subject: str = "llamaduo.v1.>") -> list[nats.aio.msg.Msg]:
        """Every message in the events stream on `subject`."""
        return await stream_messages(self.js, EVENTS_STREAM, subject)


async def wait_for(probe: Any, what: str, timeout: float, interval: float = 0.1) -> Any:
    """Await `probe()` until it returns something truthy (returned), or fail naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def stream_messages(js: JetStreamContext, stream: str, subject: str) -> list[nats.aio.msg.Msg]:
    """Every message of `stream` on `subject`, read with an ordered consumer until the stream has no more."""
    info = await js.stream_info(stream)
    last = info.state.last_seq
    out: list[nats.aio.msg.Msg] = []
    if info.state.messages == 0:
        return out
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                break
            out.append(msg)
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return out


async def dead_letters(js: JetStreamContext, expected: int, timeout: float) -> list[DeadLetter]:
    """The dead-letter stream's messages, once it holds at least `expected`."""

    async def enough() -> list[DeadLetter] | None:
        info = await js.stream_info(DEAD_LETTER_STREAM)
        if info.state.messages < expected:
            return None
        messages = await stream_messages(js, DEAD_LETTER_STREAM, "llamaduo.v1.deadletter.>")
        return [
            DeadLetter(
                service=msg.headers["llamaduo-dlq-service"],
                event_id=msg.headers["llamaduo-dlq-event-id"],
                reason=msg.headers["llamaduo-dlq-reason"],
                detail=msg.headers["llamaduo-dlq-detail"],
            )
            for msg in messages
            if msg.headers
        ] or None

    found: list[DeadLetter] = await wait_for(enough, f"{expected} dead letters", timeout, interval=0.3)
    return found


def refs_in(value: Any) -> Iterable[str]:
    """Every artifact URI inside a decoded event body (any depth)."""
    if isinstance(value, dict):
        if isinstance(value.get("uri"), str) and "sha256" in value:
            yield value["uri"]
        for item in value.values():
            yield from refs_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from refs_in(item)
