"""Talking to a running LlamaDuo from outside: submit, follow, inspect and cancel migrations."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import nats
import yaml
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamaduo.bus import EVENTS_STREAM, STATE_BUCKET, BusSettings, Publisher, StateStore, provision
from llamaduo.contract import (
    EVENTS_BY_NAME,
    Event,
    MigrationCancel,
    MigrationRequested,
    MigrationResume,
    MigrationSpec,
    Progress,
    decode,
)
from llamaduo.contract.events import Service
from llamaduo.contract.spec import BudgetSpec
from llamaduo.contract.subjects import PREFIX, STATUS_SUBJECT
from llamaduo.data import JSONL_MEDIA_TYPE, parse_jsonl
from llamaduo.state import MigrationState, Status, utcnow
from llamaduo.store import StoreSettings, open_store, path_from_file_uri
from llamaduo.telemetry import get_logger

TERMINAL_EVENTS = ("migration.graduated", "migration.failed")
RESUMABLE: frozenset[str] = frozenset({"failed", "cancelled"})
log = get_logger(__name__)


class SpecError(ValueError):
    """A migration spec file that cannot be used; the message says why."""


def load_spec(path: Path) -> MigrationSpec:
    """Read a YAML (or JSON) spec; a relative coverage path is taken relative to the spec file."""
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    coverage = raw.get("coverage")
    if isinstance(coverage, dict) and isinstance(coverage.get("uri"), str) and "://" not in coverage["uri"]:
        coverage["uri"] = str((path.parent / coverage["uri"]).resolve())
    try:
        return MigrationSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"{path}: invalid spec: {problems}") from exc


def new_migration_id(spec: MigrationSpec) -> str:
    """A readable unique id: the task name as a slug plus a short random suffix."""
    slug = "".join(c if c.isalnum() else "-" for c in spec.task.name.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)[:40] or "migration"
    return f"{slug}-{uuid.uuid4().hex[:8]}"


class ResumeRefused(ValueError):
    """A resume that cannot be asked for (unknown migration, one that has not ended, bad budgets)."""


# ---------------------------------------------------------------------------------------------------------------
# The status endpoint's wire format (core NATS request/reply on `llamaduo.v1.status`, answered by the coordinator)
# and the progress bookkeeping that both the coordinator and `llamaduo watch` use.
# ---------------------------------------------------------------------------------------------------------------


class StageProgress(BaseModel):
    """The latest `Progress` of one (service, stage) of a migration, with its rate and time left."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    service: Service
    stage: str
    iteration: int | None = None
    done: int = Field(ge=0)
    total: int | None = None
    message: str = ""
    observed_at: datetime = Field(description="When the observer received it (the observer's clock).")
    rate_per_s: float | None = Field(default=None, description="Units done per second since the stage started.")
    eta_s: float | None = Field(default=None, description="Seconds left at `observed_at`, from `rate_per_s`.")

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the stage: (service, stage)."""
        return (self.service, self.stage)

    @property
    def fraction(self) -> float | None:
        """Share done, 0..1, when the total is known."""
        if not self.total:
            return None
        return min(self.done / self.total, 1.0)

    def eta_at(self, now: datetime) -> float | None:
        """Seconds left at `now`: the estimate at `observed_at` minus the time since (never below 0)."""
        if self.eta_s is None:
            return None
        return max(self.eta_s - max((now - self.observed_at).total_seconds(), 0.0), 0.0)

    def shifted(self, offset: timedelta) -> StageProgress:
        """The same entry with `observed_at` moved by `offset` (to another machine's clock)."""
        return self.model_copy(update={"observed_at": self.observed_at + offset})


@dataclass
class _StageTrack:
    entry: StageProgress
    base_at: datetime
    base_done: int


def _rate_and_eta(
    done: int, total: int | None, at: datetime, base_at: datetime, base_done: int
) -> tuple[float | None, float | None]:
    if total is not None and done >= total:
        return None, 0.0
    elapsed = (at - base_at).total_seconds()
    if elapsed <= 0 or done <= base_done:
        return None, None
    rate = (done - base_done) / elapsed
    eta = (total - done) / rate if total is not None else None
    return rate, eta


class ProgressTracker:
    """The latest progress per (service, stage) of each migration, in memory and bounded.

    The rate of a stage is measured from the first event of its current run: a new iteration, a lower `done`
    (a redelivered task starting over) or a changed total starts a new run. Ended migrations are forgotten
    `ended_ttl_s` after they end, silent ones after `idle_ttl_s`, and past `max_migrations` the least recently
    heard-of goes first.
    """

    def __init__(
        self,
        max_migrations: int = 1000,
        max_stages: int = 32,
        ended_ttl_s: float = 900.0,
        idle_ttl_s: float = 6 * 3600.0,
    ) -> None:
        self.max_migrations = max_migrations
        self.max_stages = max_stages
        self.ended_ttl_s = ended_ttl_s
        self.idle_ttl_s = idle_ttl_s
        self._stages: OrderedDict[str, dict[tuple[str, str], _StageTrack]] = OrderedDict()
        self._last_heard: dict[str, datetime] = {}
        self._ended: dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._stages)

    def __contains__(self, migration_id: object) -> bool:
        return migration_id in self._stages

    def _touch(self, migration_id: str, at: datetime) -> dict[tuple[str, str], _StageTrack]:
        stages = self._stages.setdefault(migration_id, {})
        self._stages.move_to_end(migration_id)
        self._last_heard[migration_id] = at
        while len(self._stages) > self.max_migrations:
            oldest, _ = self._stages.popitem(last=False)
            self._last_heard.pop(oldest, None)
            self._ended.pop(oldest, None)
        return stages

    def _store(self, stages: dict[tuple[str, str], _StageTrack], track: _StageTrack) -> None:
        stages[track.entry.key] = track
        if len(stages) > self.max_stages:
            stalest = min(stages, key=lambda key: stages[key].entry.observed_at)
            del stages[stalest]

    def observe(self, event: Progress, at: datetime | None = None) -> StageProgress:
        """Record a progress event received at `at` (now by default); returns the stage's new entry."""
        at = at or utcnow()
        stages = self._touch(event.migration_id, at)
        self._ended.pop(event.migration_id, None)  # progress after an end: the migration was resumed
        previous = stages.get((event.service, event.stage))
        restart = (
            previous is None
            or previous.entry.iteration != event.iteration
            or previous.entry.total != event.total
            or event.done < previous.entry.done
        )
        base_at, base_done = (at, event.done) if restart or previous is None else (previous.base_at, previous.base_done)
        rate, eta = _rate_and_eta(event.done, event.total, at, base_at, base_done)
        entry = StageProgress(
            service=event.service,
            stage=event.stage,
            iteration=event.iteration,
            done=event.done,
            total=event.total,
            message=event.message,
            observed_at=at,
            rate_per_s=rate,
            eta_s=eta,
        )
        self._store(stages, _StageTrack(entry, base_at, base_done))
        return entry

    def merge(self, migration_id: str, entries: Iterable[StageProgress], at: datetime | None = None) -> None:
        """Take another observer's entries where they are newer (later iteration, or more done) than ours."""
        at = at or utcnow()
        stages = self._touch(migration_id, at)
        for entry in entries:
            mine = stages.get(entry.key)
            if mine is not None:
                ours = (mine.entry.iteration or 0, mine.entry.done)
                if ours >= (entry.iteration or 0, entry.done):
                    continue
            self._store(stages, _StageTrack(entry, entry.observed_at, entry.done))

    def ended(self, migration_id: str, at: datetime | None = None) -> None:
        """The migration graduated, failed or was cancelled: forget it `ended_ttl_s` from now."""
        if migration_id in self._stages:
            self._ended[migration_id] = at or utcnow()

    def snapshot(self, migration_id: str) -> list[StageProgress]:
        """The migration's stages, oldest update first (the last one is the current stage)."""
        stages = self._stages.get(migration_id, {})
        return sorted((track.entry for track in stages.values()), key=lambda entry: entry.observed_at)

    def prune(self, now: datetime | None = None) -> int:
        """Forget migrations that ended `ended_ttl_s` ago or went silent `idle_ttl_s` ago; returns how many."""
        now = now or utcnow()
        stale = [
            migration_id
            for migration_id in self._stages
            if (migration_id in self._ended and (now - self._ended[migration_id]).total_seconds() >= self.ended_ttl_s)
            or (now - self._last_heard.get(migration_id, now)).total_seconds() >= self.idle_ttl_s
        ]
        for migration_id in stale:
            self._stages.pop(migration_id, None)
            self._last_heard.pop(migration_id, None)
            self._ended.pop(migration_id, None)
        return len(stale)


def current_stage(progress: Iterable[StageProgress]) -> StageProgress | None:
    """The stage heard of last, or None."""
    latest: StageProgress | None = None
    for entry in progress:
        if latest is None or entry.observed_at >= latest.observed_at:
            latest = entry
    return latest


def migration_eta(state: MigrationState, progress: Iterable[StageProgress], now: datetime) -> float | None:
    """Seconds left in the current stage, when its rate is known and the migration still runs."""
    if state.terminal:
        return None
    current = current_stage(progress)
    return current.eta_at(now) if current is not None else None


class MigrationSummary(BaseModel):
    """One line of the migration list."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    migration_id: str
    task: str = ""
    status: Status
    iteration: int
    spend_usd: float
    calls: int = 0
    best_scores: dict[str, float] | None = Field(default=None, description="Means of the best scored iteration.")
    failure_reason: str | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, state: MigrationState) -> MigrationSummary:
        """The summary of a state."""
        best = state.best()
        return cls(
            migration_id=state.migration_id,
            task=state.spec.task.name,
            status=state.status,
            iteration=state.iteration,
            spend_usd=state.spend.usd,
            calls=state.spend.calls,
            best_scores={metric: s.mean for metric, s in best.scores.items()} if best and best.scores else None,
            failure_reason=state.failure_reason,
            created_at=state.created_at,
            updated_at=state.updated_at,
        )


Source = Literal["coordinator", "kv"]


class StatusReport(BaseModel):
    """One migration's state, with live progress when a coordinator answered."""

    state: MigrationState
    progress: list[StageProgress] = Field(default_factory=list)
    eta_s: float | None = None
    source: Source = "coordinator"
    note: str = Field(default="", description="Why the report is partial (e.g. read from KV, no live progress).")

    @property
    def current(self) -> StageProgress | None:
        """The stage heard of last."""
        return current_stage(self.progress)


class MigrationList(BaseModel):
    """Every migration, newest last."""

    migrations: list[MigrationSummary]
    source: Source = "coordinator"
    note: str = ""
    truncated: bool = False


class StatusUnavailable(Exception):
    """No coordinator answered the status request (none runs, or none answered in time)."""


def _json_body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatusUnavailable(f"the coordinator's reply is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise StatusUnavailable("the coordinator's reply is not a JSON object")
    return body


class Client:
    """A connection to the bus and the store, for people and programs outside the services."""

    def __init__(self, bus: BusSettings, store: StoreSettings) -> None:
        self.bus = bus
        self.store_settings = store
        self.nc: NatsClient | None = None

    async def __aenter__(self) -> Client:
        self.nc = await nats.connect(**self.bus.connect_options())  # type: ignore[arg-type]
        await provision(self.nc.jetstream(), self.bus)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()

    @property
    def js(self) -> Any:
        """The JetStream context."""
        assert self.nc is not None, "use `async with Client(...)`"
        return self.nc.jetstream()

    async def states(self) -> StateStore:
        """The migration-state bucket."""
        return StateStore(await self.js.key_value(STATE_BUCKET))

    def upload_coverage(self, spec: MigrationSpec, migration_id: str) -> MigrationSpec:
        """Put a local coverage file into the artifact store so services on other machines can read it."""
        if "://" in spec.coverage.uri and not spec.coverage.uri.startswith("file://"):
            return spec
        path = path_from_file_uri(spec.coverage.uri)
        if not path.is_file():
            raise SpecError(f"coverage dataset not found: {path}")
        parse_jsonl(path.read_bytes(), str(path))  # fail here, before anything is published
        store = open_store(self.store_settings)
        ref = store.put_file(f"migrations/{migration_id}/shared/coverage/source.jsonl", path, JSONL_MEDIA_TYPE)
        coverage = spec.coverage.model_copy(update={"uri": ref.uri, "sha256": ref.sha256})
        return spec.model_copy(update={"coverage": coverage})

    async def submit(self, spec: MigrationSpec, migration_id: str | None = None) -> str:
        """Publish `migration.requested`; returns the migration id."""
        migration_id = migration_id or spec.migration_id or new_migration_id(spec)
        spec = await asyncio.to_thread(self.upload_coverage, spec, migration_id)
        spec = spec.model_copy(update={"migration_id": migration_id})
        publisher = Publisher(self.js, "llamaduo/client", self.bus)
        await publisher.publish(MigrationRequested(migration_id=migration_id, spec=spec))
        return migration_id

    async def cancel(self, migration_id: str, reason: str = "cancelled by user") -> None:
        """Publish `migration.cancel`."""
        publisher = Publisher(self.js, "llamaduo/client", self.bus)
        await publisher.publish(MigrationCancel(migration_id=migration_id, reason=reason))

    async def status(self, migration_id: str) -> MigrationState | None:
        """The migration's state from KV."""
        found = await (await self.states()).get(migration_id)
        return found[0] if found else None

    # `timeout` bounds the wait for a coordinator's reply, after which the KV answers instead: it is not a deadline
    # on the whole call, so asyncio.timeout() is not a substitute (ASYNC109).
    async def _request_status(self, body: Mapping[str, object], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        """Ask the coordinators' status endpoint (one replica of the queue group answers)."""
        assert self.nc is not None, "use `async with Client(...)`"
        try:
            reply = await self.nc.request(STATUS_SUBJECT, json.dumps(body).encode(), timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise StatusUnavailable("no coordinator is running") from exc
        except nats.errors.TimeoutError as exc:
            raise StatusUnavailable(f"no coordinator answered in {timeout:g}s") from exc
        return _json_body(reply.data)

    async def _kv_report(self, migration_id: str, why: str) -> StatusReport | None:
        state = await self.status(migration_id)
        if state is None:
            return None
        log.info("status read from KV", extra={"migration_id": migration_id, "why": why})
        return StatusReport(state=state, source="kv", note=f"{why}; state read from KV, no live progress")

    async def status_report(self, migration_id: str, timeout: float = 2.0) -> StatusReport | None:  # noqa: ASYNC109
        """State and live progress from the coordinator's status endpoint; None for an unknown migration.

        When no coordinator answers (none runs, or it is too busy) the state comes from KV instead, without
        progress, and the report's `source` is "kv" with a `note` saying why.
        """
        try:
            reply = await self._request_status({"migration_id": migration_id}, timeout)
        except StatusUnavailable as exc:
            return await self._kv_report(migration_id, str(exc))
        received = utcnow()
        if "error" in reply:
            if reply.get("code") == "unknown_migration":
                return None
            return await self._kv_report(migration_id, f"the coordinator answered: {reply['error']}")
        try:
            state = MigrationState.model_validate(
                {key: value for key, value in reply.items() if key in MigrationState.model_fields}
            )
            progress = [StageProgress.model_validate(item) for item in reply.get("progress") or []]
            replied_at = datetime.fromisoformat(str(reply["replied_at"])) if reply.get("replied_at") else None
            eta = reply.get("eta_s")
            eta_s = float(eta) if isinstance(eta, int | float) else None
        except (ValidationError, ValueError) as exc:
            return await self._kv_report(migration_id, f"the coordinator's reply is unreadable: {exc}")
        if replied_at is not None:
            # Progress times are on the coordinator's clock; move them to ours so "ago" and ETAs hold here.
            offset = received - replied_at
            progress = [entry.shifted(offset) for entry in progress]
        return StatusReport(state=state, progress=progress, eta_s=eta_s, source="coordinator")

    async def list_report(self, timeout: float = 2.0) -> MigrationList:  # noqa: ASYNC109
        """Every migration from the status endpoint, or from KV when no coordinator answers."""
        try:
            reply = await self._request_status({"migration_id": None}, timeout)
            if "error" in reply:
                raise StatusUnavailable(f"the coordinator answered: {reply['error']}")
            migrations = [MigrationSummary.model_validate(item) for item in reply.get("migrations") or []]
            return MigrationList(migrations=migrations, truncated=bool(reply.get("truncated")))
        except (StatusUnavailable, ValidationError) as exc:
            states = await (await self.states()).list()
            summaries = [MigrationSummary.of(state) for state in sorted(states, key=lambda s: s.created_at)]
            return MigrationList(migrations=summaries, source="kv", note=f"{exc}; list read from KV")

    async def resume(
        self,
        migration_id: str,
        budgets_overrides: Mapping[str, object] | None = None,
        reason: str = "resumed by user",
    ) -> str:
        """Publish `migration.resume` for a failed or cancelled migration; returns the request id.

        The resumed run's budgets are the migration's current ones with `budgets_overrides` applied (keys are
        `BudgetSpec` fields). Raises `ResumeRefused` for an unknown migration, one that has not ended, one that
        graduated, or overrides that do not make valid budgets.
        """
        state = await self.status(migration_id)
        if state is None:
            raise ResumeRefused(f"no migration {migration_id!r}")
        if state.status not in RESUMABLE:
            raise ResumeRefused(
                f"migration {migration_id} is {state.status}; only a failed or cancelled migration can be resumed"
            )
        overrides = dict(budgets_overrides or {})
        unknown = sorted(set(overrides) - set(BudgetSpec.model_fields))
        if unknown:
            raise ResumeRefused(f"unknown budget fields {unknown}; known: {sorted(BudgetSpec.model_fields)}")
        try:
            budgets = BudgetSpec.model_validate({**state.spec.budgets.model_dump(), **overrides})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ResumeRefused(f"invalid budgets: {problems}") from exc
        request_id = uuid.uuid4().hex
        publisher = Publisher(self.js, "llamaduo/client", self.bus)
        await publisher.publish(
            MigrationResume(migration_id=migration_id, request_id=request_id, budgets=budgets, reason=reason)
        )
        log.info(
            "resume requested",
            extra={"migration_id": migration_id, "request_id": request_id, "budgets": budgets.model_dump()},
        )
        return request_id

    async def follow(
        self,
        migration_id: str,
        since: datetime,
        idle_timeout: float | None = None,
        stop_at_terminal: bool = True,
    ) -> AsyncIterator[Event]:
        """Every event of one migration from `since` on, ending after graduated or failed.

        An ordered ephemeral consumer: watching never takes work from a service. With `stop_at_terminal`
        false it goes on after a terminal event (a resumed migration continues) until the caller stops.
        """
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=since - timedelta(seconds=2),
        )
        # Name the stream: the wildcard also matches the dead-letter stream's subjects.
        sub = await self.js.subscribe(f"{PREFIX}.>", stream=EVENTS_STREAM, ordered_consumer=True, config=config)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout if idle_timeout else 3600 * 24)
                except nats.errors.TimeoutError:
                    raise TimeoutError(f"no event for migration {migration_id} in {idle_timeout}s") from None
                headers = msg.headers or {}
                if headers.get("ce-subject") != migration_id:
                    continue
                name = msg.subject.removeprefix(f"{PREFIX}.")
                model = EVENTS_BY_NAME.get(name)
                if model is None:
                    continue
                try:
                    event = decode(msg.data, model)
                except Exception:
                    continue
                yield event
                if stop_at_terminal and name in TERMINAL_EVENTS:
                    return
        finally:
            await sub.unsubscribe()
