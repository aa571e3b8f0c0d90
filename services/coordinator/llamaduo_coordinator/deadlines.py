"""The deadline sweep: a coordinator task that fails running migrations whose wall-clock deadline has passed.

A deadline must end a migration even while no event arrives (a stage that runs for hours), so the coordinator
checks every `deadline_check_s` instead of waiting for the next decision. Every replica sweeps; failing a migration
is a compare-and-set on its state, so only one replica's failure event is published for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from faststream import FastStream
from nats.js import JetStreamContext

from llamaduo.bus import STATE_BUCKET, Publisher, StateStore
from llamaduo.telemetry import get_logger
from llamaduo_coordinator.lifecycle import Coordinator
from llamaduo_coordinator.settings import CoordinatorSettings

log = get_logger("llamaduo.coordinator", stage="deadline")


class DeadlineSweep:
    """Runs `Coordinator.expire_deadlines` periodically while the app runs, publishing what it decides."""

    def __init__(
        self, coordinator: Coordinator, settings: CoordinatorSettings, jetstream: Callable[[], JetStreamContext]
    ) -> None:
        self.coordinator = coordinator
        self.settings = settings
        self.jetstream = jetstream
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def attach(self, app: FastStream) -> None:
        """Start with the app (after its broker connected), stop with it."""
        app.after_startup(self.start)
        app.on_shutdown(self.stop)

    async def start(self) -> None:
        """Begin sweeping in the background."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._loop(), name="llamaduo-deadline-sweep")

    async def stop(self) -> None:
        """Stop sweeping."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep(self) -> int:
        """One pass: fail what is past its deadline, publish the failures; returns how many were published."""
        js = self.jetstream()
        states = StateStore(await js.key_value(STATE_BUCKET))
        events = await self.coordinator.expire_deadlines(states, log)
        publisher = Publisher(js, "llamaduo/coordinator", self.settings)
        for event in events:
            await publisher.publish(event)
        return len(events)

    async def _loop(self) -> None:
        # The flag as well as the cancel: Python 3.11's wait_for (inside nats-py) can swallow a cancel that lands as
        # its timeout fires, and the sweep below turns the resulting timeout into "try again".
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.deadline_check_s)
            if self._stopping.is_set():
                return
            try:
                await self.sweep()
            except Exception as exc:  # the next pass tries again; a sweep must never kill the coordinator
                log.warning("deadline sweep failed", extra={"error": repr(exc)})
