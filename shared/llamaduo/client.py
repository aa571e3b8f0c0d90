"""Talking to a running LlamaDuo from outside: submit, follow, inspect and cancel migrations."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from llamaduo.bus import EVENTS_STREAM, STATE_BUCKET, BusSettings, Publisher, StateStore, provision
from llamaduo.contract import EVENTS_BY_NAME, Event, MigrationCancel, MigrationRequested, MigrationSpec, decode
from llamaduo.contract.subjects import PREFIX
from llamaduo.data import JSONL_MEDIA_TYPE, parse_jsonl
from llamaduo.state import MigrationState
from llamaduo.store import StoreSettings, open_store, path_from_file_uri

TERMINAL_EVENTS = ("migration.graduated", "migration.failed")


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

    async def follow(
        self, migration_id: str, since: datetime, idle_timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """Every event of one migration from `since` on, ending after graduated or failed.

        An ordered ephemeral consumer: watching never takes work from a service.
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
                if name in TERMINAL_EVENTS:
                    return
        finally:
            await sub.unsubscribe()
