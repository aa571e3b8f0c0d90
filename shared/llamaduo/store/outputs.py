"""One stage's outputs in the store: deterministic keys, and the "written last" marker that makes tasks idempotent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from llamaduo.contract.artifacts import ArtifactRef
from llamaduo.store.base import ArtifactStore, artifact_key

JSON_MEDIA_TYPE = "application/json"


class StageOutputs:
    """The artifacts of one (migration, iteration, stage), read and written off the event loop."""

    def __init__(self, store: ArtifactStore, migration_id: str, iteration: int | None, stage: str) -> None:
        self.store = store
        self.migration_id = migration_id
        self.iteration = iteration
        self.stage = stage

    def key(self, name: str) -> str:
        """The deterministic key of the output `name`."""
        return artifact_key(self.migration_id, self.iteration, self.stage, name)

    async def head(self, name: str, media_type: str) -> ArtifactRef | None:
        """The stored output `name`, or None."""
        return await asyncio.to_thread(self.store.head, self.key(name), media_type)

    async def put(self, name: str, data: bytes, media_type: str) -> ArtifactRef:
        """Store `data` as the output `name`."""
        return await asyncio.to_thread(self.store.put_bytes, self.key(name), data, media_type)

    async def put_json(self, name: str, value: Any, media_type: str = JSON_MEDIA_TYPE) -> ArtifactRef:
        """Store `value` as indented JSON."""
        return await self.put(name, json.dumps(value, indent=1).encode(), media_type)

    async def completed(self, marker: str, media_type: str = JSON_MEDIA_TYPE) -> Any | None:
        """The marker JSON a finished task writes after every other output, or None while the stage is unfinished."""
        ref = await self.head(marker, media_type)
        if ref is None:
            return None
        return json.loads(await asyncio.to_thread(self.store.read_bytes, ref))
