"""The artifact store interface, its errors, and the deterministic key layout."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from llamaduo.contract.artifacts import ArtifactRef

CHUNK = 1 << 20


class ArtifactError(Exception):
    """A terminal problem with an artifact: retrying will not help."""

    reason = "artifact_error"

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(f"{detail} ({uri})")
        self.uri = uri
        self.detail = detail


class ArtifactMissing(ArtifactError):
    """The referenced object does not exist."""

    reason = "missing_artifact"


class ChecksumMismatch(ArtifactError):
    """The object's bytes do not match the sha256 in its reference."""

    reason = "checksum_mismatch"


class ArtifactOutsideStore(ArtifactError, ValueError):
    """A key or URI that points outside the configured bucket, prefix or root directory: refused, never read."""

    reason = "artifact_outside_store"


def check_key(key: str) -> str:
    """`key` when it is a plain relative key; `ArtifactOutsideStore` for absolute keys, `..`, `.` or empty parts."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in parts):
        raise ArtifactOutsideStore(key, f"key escapes the store: {key!r} must be a relative path without '..'")
    if any(ord(char) < 32 for char in key):
        raise ArtifactOutsideStore(key, f"key escapes the store: {key!r} holds control characters")
    return key


class StoreUnavailable(Exception):
    """The store could not be reached; the operation may succeed later."""


def artifact_key(migration_id: str, iteration: int | None, stage: str, name: str) -> str:
    """Deterministic key of one stage's output: the same task always writes the same key."""
    scope = "shared" if iteration is None else f"iter-{iteration:04d}"
    return f"migrations/{migration_id}/{scope}/{stage}/{name}"


def sha256_of_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_stream(stream: BinaryIO, sink: BinaryIO | None = None) -> tuple[str, int]:
    """Hex SHA-256 and size of a stream, copying it into `sink` on the way."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest(), size


def verify(ref: ArtifactRef, sha256: str) -> None:
    """Raise `ChecksumMismatch` unless `sha256` is the one `ref` promises."""
    if sha256 != ref.sha256:
        raise ChecksumMismatch(ref.uri, f"sha256 mismatch: expected {ref.sha256}, read {sha256}")


class ArtifactStore(ABC):
    """Immutable objects under deterministic keys; no partially written object is ever visible."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI an object stored under `key` has."""

    @abstractmethod
    def put_file(self, key: str, path: Path, media_type: str = "application/octet-stream") -> ArtifactRef:
        """Store a file's bytes under `key` atomically and return its reference."""

    @abstractmethod
    def head(self, key: str, media_type: str = "application/octet-stream") -> ArtifactRef | None:
        """The reference of the object under `key`, or None when there is none."""

    @abstractmethod
    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        """Write the object to `dest` (atomically), verifying its sha256."""

    @abstractmethod
    def read_uri(self, uri: str) -> bytes:
        """Bytes of any object this store can address, unverified (for user-supplied URIs)."""

    def put_bytes(self, key: str, data: bytes, media_type: str = "application/octet-stream") -> ArtifactRef:
        """Store bytes under `key` atomically and return the reference."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="llamaduo-put-") as tmp:
            path = Path(tmp) / "object"
            path.write_bytes(data)
            return self.put_file(key, path, media_type)

    def read_bytes(self, ref: ArtifactRef) -> bytes:
        """The object's bytes, verified against the reference's sha256."""
        data = self.read_uri(ref.uri)
        verify(ref, hashlib.sha256(data).hexdigest())
        return data
