"""Dataset manifests: the training data of an iteration as a list of verified shards."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llamaduo.contract.artifacts import ArtifactRef
from llamaduo.data.rows import ChatRow, parse_jsonl
from llamaduo.store.base import ArtifactStore

MANIFEST_MEDIA_TYPE = "application/vnd.llamaduo.dataset-manifest+json"
JSONL_MEDIA_TYPE = "application/jsonl"


class Shard(BaseModel):
    """One JSONL file of training rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: ArtifactRef
    rows: int = Field(ge=0)
    origin: Literal["coverage", "synthetic"]
    round_index: int | None = Field(default=None, description="Synthesis round that wrote it.")


class DatasetManifest(BaseModel):
    """The training set of one iteration: the coverage train split plus every synthetic shard so far."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    migration_id: str
    iteration: int = Field(ge=0)
    shards: list[Shard]

    @property
    def rows(self) -> int:
        """Total training rows."""
        return sum(shard.rows for shard in self.shards)

    @property
    def synthetic_rows(self) -> int:
        """Rows the service LLM wrote."""
        return sum(shard.rows for shard in self.shards if shard.origin == "synthetic")


def read_manifest(store: ArtifactStore, ref: ArtifactRef) -> DatasetManifest:
    """Load a manifest, verifying its sha256."""
    return DatasetManifest.model_validate_json(store.read_bytes(ref))


def read_rows(store: ArtifactStore, ref: ArtifactRef) -> list[ChatRow]:
    """Load one JSONL artifact, verifying its sha256."""
    return parse_jsonl(store.read_bytes(ref), ref.uri)


def read_training_rows(store: ArtifactStore, manifest: DatasetManifest) -> list[ChatRow]:
    """Every row of every shard, each shard verified."""
    rows: list[ChatRow] = []
    for shard in manifest.shards:
        rows.extend(read_rows(store, shard.ref))
    return rows
