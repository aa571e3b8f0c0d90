"""The stored outputs of one iteration's stages, read so that a stage that never ran is absent, not an error.

The workers write these under `artifact_key(migration, iteration, stage, name)`; the media types are the ones each
worker stores them with (the services own them; they are repeated here so the shared library needs no service).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from llamaduo.contract import ArtifactRef
from llamaduo.data import JSONL_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, DatasetError
from llamaduo.store import ArtifactError, ArtifactStore, artifact_key
from llamaduo.store.archive import TAR_MEDIA_TYPE

T = TypeVar("T")

SYNTHESIS_MEDIA_TYPE = "application/vnd.llamaduo.synthesis+json"
TRAINING_MEDIA_TYPE = "application/vnd.llamaduo.training-result+json"
INFERENCE_MEDIA_TYPE = "application/vnd.llamaduo.inference+json"
EVALUATION_MEDIA_TYPE = "application/vnd.llamaduo.evaluation+json"
LINEAGE_MEDIA_TYPE = "application/vnd.llamaduo.lineage+json"


@dataclass(frozen=True)
class StageFile:
    """One named output of a stage."""

    stage: str
    name: str
    media_type: str

    @property
    def label(self) -> str:
        """`stage/name`, as the report and the lineage name it."""
        return f"{self.stage}/{self.name}"

    def key(self, migration_id: str, iteration: int) -> str:
        """The file's key for one iteration."""
        return artifact_key(migration_id, iteration, self.stage, self.name)


MANIFEST = StageFile("dataset", "manifest.json", MANIFEST_MEDIA_TYPE)
SYNTHESIS = StageFile("dataset", "synthesis.json", SYNTHESIS_MEDIA_TYPE)
ADAPTER = StageFile("adapter", "adapter.tar", TAR_MEDIA_TYPE)
TRAINING = StageFile("adapter", "training.json", TRAINING_MEDIA_TYPE)
RESPONSES = StageFile("responses", "responses.jsonl", JSONL_MEDIA_TYPE)
INFERENCE = StageFile("responses", "inference.json", INFERENCE_MEDIA_TYPE)
JUDGMENTS = StageFile("judgments", "judgments.jsonl", JSONL_MEDIA_TYPE)
EVALUATION = StageFile("judgments", "evaluation.json", EVALUATION_MEDIA_TYPE)
LINEAGE = StageFile("lineage", "lineage.json", LINEAGE_MEDIA_TYPE)


class IterationFiles:
    """Reads one iteration's outputs, noting each expected file that is absent and each that cannot be read.

    Only terminal artifact problems (missing, checksum mismatch, malformed content) are noted; a store that cannot
    be reached (`StoreUnavailable`) propagates, since the report would otherwise silently omit everything.
    """

    def __init__(self, store: ArtifactStore, migration_id: str, iteration: int) -> None:
        self.store = store
        self.migration_id = migration_id
        self.iteration = iteration
        self.absent: list[str] = []
        self.problems: list[str] = []

    def head(self, file: StageFile, *, expected: bool = True) -> ArtifactRef | None:
        """The file's reference, or None (noted as absent when the stage was expected to have written it)."""
        ref = self.store.head(file.key(self.migration_id, self.iteration), file.media_type)
        if ref is None and expected and file.label not in self.absent:
            self.absent.append(file.label)
        return ref

    def read(self, ref: ArtifactRef, parse: Callable[[bytes], T], what: str) -> T | None:
        """`parse` of the object's verified bytes, or None (noted as a problem) when it cannot be read."""
        try:
            return parse(self.store.read_bytes(ref))
        except (ArtifactError, DatasetError, ValueError) as exc:
            self.problems.append(f"{what} unreadable: {exc}")
            return None

    def json(self, file: StageFile) -> tuple[ArtifactRef, dict[str, Any]] | None:
        """The reference and JSON object of `file`, or None when absent or unreadable."""
        ref = self.head(file)
        if ref is None:
            return None
        value = self.read(ref, json.loads, file.label)
        if not isinstance(value, dict):
            if value is not None:
                self.problems.append(f"{file.label} unreadable: expected a JSON object")
            return None
        return ref, value


def read_stage_json(store: ArtifactStore, migration_id: str, iteration: int, file: StageFile) -> dict[str, Any] | None:
    """One stage's JSON summary, or None when it is absent or unreadable."""
    found = IterationFiles(store, migration_id, iteration).json(file)
    return found[1] if found else None
