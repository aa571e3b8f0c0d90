"""Training checkpoints in the artifact store: written every `training.checkpoint_steps`, resumed on redelivery.

`checkpoint.tar` holds the trainer's latest checkpoint folder (adapter, optimizer, scheduler, RNG, trainer state);
`checkpoint.json`, written after it, commits it with the run it belongs to and the archive's sha256. A checkpoint of
another run (another dataset, settings or starting adapter) or one whose upload was cut short is never resumed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llamaduo.store import ArtifactStore, artifact_key
from llamaduo.store.archive import TAR_MEDIA_TYPE, pack_dir, unpack_dir

CHECKPOINT_MEDIA_TYPE = "application/vnd.llamaduo.training-checkpoint+json"


def run_id(material: dict[str, Any]) -> str:
    """A short, stable id of what a run depends on."""
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointStore:
    """The stored checkpoint of one (migration, iteration) training run."""

    def __init__(self, store: ArtifactStore, migration_id: str, iteration: int, run: str, scratch: Path) -> None:
        self.store = store
        self.run = run
        self.scratch = scratch
        self.archive_key = artifact_key(migration_id, iteration, "adapter", "checkpoint.tar")
        self.record_key = artifact_key(migration_id, iteration, "adapter", "checkpoint.json")

    def save(self, folder: Path, step: int) -> None:
        """Upload a checkpoint folder, then the record that commits it."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        ref = self.store.put_file(self.archive_key, pack_dir(folder, self.scratch / "checkpoint.tar"), TAR_MEDIA_TYPE)
        record = {"run": self.run, "step": step, "sha256": ref.sha256, "folder": folder.name}
        self.store.put_bytes(self.record_key, json.dumps(record).encode(), CHECKPOINT_MEDIA_TYPE)

    def latest(self) -> tuple[Path, int] | None:
        """The stored checkpoint of this run, downloaded and unpacked, with its step; None when there is none."""
        record_ref = self.store.head(self.record_key, CHECKPOINT_MEDIA_TYPE)
        if record_ref is None:
            return None
        record = json.loads(self.store.read_bytes(record_ref))
        if record.get("run") != self.run:
            return None
        archive_ref = self.store.head(self.archive_key, TAR_MEDIA_TYPE)
        if archive_ref is None or archive_ref.sha256 != record.get("sha256"):
            return None  # a newer checkpoint's upload was cut short: start over rather than mix the two
        self.scratch.mkdir(parents=True, exist_ok=True)
        archive = self.store.download(archive_ref, self.scratch / "resume.tar")
        step = int(record["step"])
        # Named like the trainer's own folders, so `resume_from_checkpoint` reads the step from it too.
        return unpack_dir(archive, self.scratch / "resume" / str(record.get("folder") or f"checkpoint-{step}")), step
