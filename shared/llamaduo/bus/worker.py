"""The task runtime every service shares: decode, heartbeat, run the domain call, publish, then ack.

Delivery rules (ARCHITECTURE.md): ack only after the outputs' PubAcks came back; poison input goes to the
dead-letter subject with its reason and fails the migration; transient faults are retried with jittered
backoff until `max_deliver`, then dead-lettered; a task cancelled by shutdown is handed back at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llamaduo.bus.kv import StateStore
from llamaduo.bus.provisioning import STATE_BUCKET
from llamaduo.bus.publisher import Publisher
from llamaduo.bus.settings import BusSettings
from llamaduo.contract import Event, EventTooLarge, PoisonMessage, Progress, TaskFailed, decode
from llamaduo.contract.events import IterationEvent, Service
from llamaduo.data import DatasetError
from llamaduo.llm import LLMRequestError, SpendCap
from llamaduo.store import ArtifactError
from llamaduo.telemetry import ContextLogger, get_logger

E = TypeVar("E", bound=Event)


class TaskError(Exception):
    """A task that can never succeed (bad input, impossible request): it is dead-lettered, not retried."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def terminal_reason(exc: BaseException) -> tuple[str, str] | None:
    """(reason, detail) when `exc` means the task can never succeed, else None (retry it)."""
    if isinstance(exc, PoisonMessage | TaskError):
        return exc.reason, exc.detail
    if isinstance(exc, ArtifactError):
        return exc.reason, str(exc)
    if isinstance(exc, EventTooLarge):
        return "oversized_output", str(exc)
    if isinstance(exc, DatasetError):
        return "invalid_dataset", str(exc)
    if isinstance(exc, LLMRequestError):
        # 400/401/403/404 from the service LLM: a wrong key, model or request is not fixed by retrying.
        return f"service_llm:{getattr(exc, 'reason', 'rejected')}", str(exc)
    return None


@dataclass
class TaskContext:
    """What a handler may use besides its event: logging, progress and the service's identity."""

    service: Service
    event_id: str
    delivery: int
    log: ContextLogger
    publisher: Publisher
    migration_id: str
    iteration: int | None
    states: Callable[[], Awaitable[StateStore]]
    _progress_seq: int = field(default=0)

    async def progress(self, stage: str, done: int, total: int | None, message: str = "") -> None:
        """Tell observers where the task is; never fails the task."""
        self._progress_seq += 1
        event = Progress(
            migration_id=self.migration_id,
            iteration=self.iteration,
            service=self.service,
            stage=stage,
            done=done,
            total=total,
            message=message,
        )
        try:
            await self.publisher.publish(
                event, ce_id=f"{self.event_id}:progress:{self.service}:{self.delivery}:{self._progress_seq}"
            )
        except Exception as exc:  # progress is advisory; a lost one must not cost the task
            self.log.warning("progress not published", extra={"error": repr(exc)})

    async def spend_cap(self, max_cost_usd: float | None) -> SpendCap | None:
        """The dollar cap left to this task: the migration's `max_cost_usd` less what its ledger holds so far."""
        if max_cost_usd is None:
            return None
        found = await (await self.states()).get(self.migration_id)
        spent = found[0].spend.usd if found is not None else 0.0
        return SpendCap.for_migration(max_cost_usd, spent)

    def progress_reporter(self, stage: str, min_interval_s: float = 1.0) -> Callable[..., None]:
        """A callback `report(done, total, message="")` for worker threads that sends progress at most every
        `min_interval_s` (and at the end)."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def report(done: int, total: int | None, message: str = "") -> None:
            now = loop.time()
            if now - last[0] < min_interval_s and done != total:
                return
            last[0] = now
            asyncio.run_coroutine_threadsafe(self.progress(stage, done, total, message), loop)

        return report


Handler = Callable[[E, TaskContext], Awaitable[Sequence[Event]]]


@dataclass
class Worker(Generic[E]):
    """Runs one service's handler for one input event type over raw JetStream messages."""

    service: Service
    stage: str
    model: type[E]
    handle: Handler[E]
    settings: BusSettings
    js: JetStreamContext
    skip_terminal: bool = True
    log: ContextLogger = field(init=False)
    publisher: Publisher = field(init=False)
    _states: StateStore | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.log = get_logger(f"llamaduo.{self.service}", stage=self.stage)
        self.publisher = Publisher(self.js, f"llamaduo/{self.service}", self.settings)

    async def states(self) -> StateStore:
        """The migration-state bucket (opened on first use)."""
        if self._states is None:
            self._states = StateStore(await self.js.key_value(STATE_BUCKET))
        return self._states

    async def process(self, msg: Msg) -> None:
        """Handle one delivery of one message, ending in exactly one of ack, nak(delay) or term."""
        headers = dict(msg.headers or {})
        meta = msg.metadata
        delivery = meta.num_delivered or 1
        ident = headers.get("Nats-Msg-Id") or headers.get("ce-id") or f"{meta.stream}:{meta.sequence.stream}"
        log = self.log.bind(event_id=ident, delivery=delivery)
        try:
            event = decode(msg.data, self.model, headers, max_bytes=self.settings.max_event_bytes)
        except PoisonMessage as poison:
            log.bind(migration_id=poison.migration_id).error(
                "poison message", extra={"reason": poison.reason, "detail": poison.detail}
            )
            await self._give_up(msg, ident, delivery, poison.reason, poison.detail, poison.migration_id, None)
            return
        iteration = event.iteration if isinstance(event, IterationEvent) else None
        log = log.bind(migration_id=event.migration_id, iteration=iteration)
        if self.skip_terminal and await self._migration_ended(event.migration_id):
            log.info("migration already ended; task skipped")
            await msg.ack_sync()
            return
        context = TaskContext(
            self.service, ident, delivery, log, self.publisher, event.migration_id, iteration, self.states
        )
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            log.info("task started")
            outputs = await self.handle(event, context)
            for output in outputs:
                await self.publisher.publish(output)
            await msg.ack_sync()
            log.info("task done", extra={"outputs": [o.name for o in outputs]})
        except asyncio.CancelledError:
            # Shutdown ran past the graceful timeout: hand the task back so another replica starts it now.
            await asyncio.shield(msg.nak())
            raise
        except Exception as exc:
            terminal = terminal_reason(exc)
            if terminal is not None:
                log.error("task failed for good", extra={"reason": terminal[0], "detail": terminal[1]})
                await self._give_up(msg, ident, delivery, *terminal, event.migration_id, iteration)
            elif delivery >= self.settings.max_deliver:
                log.error("retries exhausted", exc_info=True)
                detail = f"{self.settings.max_deliver} attempts failed; last error: {exc!r}"
                await self._give_up(msg, ident, delivery, "retries_exhausted", detail, event.migration_id, iteration)
            else:
                delay = self._backoff(delivery)
                log.warning("task failed; will retry", exc_info=True, extra={"retry_in_s": round(delay, 2)})
                await msg.nak(delay=delay)
        finally:
            heartbeat.cancel()

    def _backoff(self, delivery: int) -> float:
        ceiling = min(self.settings.retry_base_delay_s * 2 ** (delivery - 1), self.settings.retry_max_delay_s)
        return float(ceiling * (0.5 + random.random() / 2))

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await msg.in_progress()
            except Exception as exc:
                self.log.warning("heartbeat failed", extra={"error": repr(exc)})

    async def _migration_ended(self, migration_id: str) -> bool:
        try:
            found = await (await self.states()).get(migration_id)
        except Exception as exc:  # state is advisory here: never lose a task because KV hiccupped
            self.log.warning("state lookup failed", extra={"error": repr(exc)})
            return False
        return found is not None and found[0].terminal

    async def _give_up(
        self,
        msg: Msg,
        ident: str,
        delivery: int,
        reason: str,
        detail: str,
        migration_id: str | None,
        iteration: int | None,
    ) -> None:
        """Dead-letter the message, fail its migration, then terminate it (in that order, so nothing is lost)."""
        await self.publisher.dead_letter(
            self.service,
            body=msg.data,
            headers=msg.headers,
            subject=msg.subject,
            reason=reason,
            detail=detail,
            event_id=ident,
            delivery=delivery,
        )
        if migration_id is not None:
            failed = TaskFailed(
                migration_id=migration_id,
                iteration=iteration,
                service=self.service,
                stage=self.stage,
                reason=reason,
                detail=detail[:4000],
                input_event_id=ident,
            )
            await self.publisher.publish(failed, ce_id=f"{ident}:task.failed:{self.service}")
        await msg.term()
