"""Migration state in the NATS KV bucket, written with compare-and-set on the revision."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from llamaduo.state import MigrationState, utcnow


class StateConflict(Exception):
    """Another writer kept changing the state; the update was not applied."""


class StateStore:
    """Read and CAS-update `MigrationState` records."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, migration_id: str) -> tuple[MigrationState, int] | None:
        """The state and its revision, or None."""
        try:
            entry = await self.kv.get(migration_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return MigrationState.model_validate_json(entry.value), int(entry.revision or 0)

    async def create(self, state: MigrationState) -> bool:
        """Write a new state; False when the migration already exists."""
        try:
            await self.kv.create(state.migration_id, state.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def update(
        self, migration_id: str, change: Callable[[MigrationState], MigrationState | None], attempts: int = 20
    ) -> MigrationState | None:
        """Apply `change` by compare-and-set, re-reading on conflict. `change` returns None to write nothing."""
        for _ in range(attempts):
            current = await self.get(migration_id)
            if current is None:
                return None
            state, revision = current
            updated = change(state.model_copy(deep=True))
            if updated is None:
                return state
            updated.updated_at = utcnow()
            try:
                await self.kv.update(migration_id, updated.model_dump_json().encode(), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return updated
        raise StateConflict(f"could not update migration {migration_id} after {attempts} attempts")

    async def list(self) -> list[MigrationState]:
        """Every migration in the bucket."""
        keys = await self._keys()
        states = []
        for key in keys:
            found = await self.get(key)
            if found:
                states.append(found[0])
        return states

    async def _keys(self, attempts: int = 4) -> Sequence[str]:
        """The bucket's keys. nats-py's `keys()` can report an empty bucket when its watcher's "caught up" check
        races the first delivery (seen under load in CI): when the bucket's stream holds messages, ask again."""
        for attempt in range(attempts):
            try:
                keys: Sequence[str] = await self.kv.keys()
                return keys
            except Exception as exc:  # nats-py raises NoKeysError (not exported everywhere) for an empty bucket
                if type(exc).__name__ != "NoKeysError":
                    raise
            if (await self.kv.status()).values == 0 or attempt == attempts - 1:
                return []  # truly empty (or only deletions remain)
            await asyncio.sleep(0.1 * (attempt + 1))
        return []
