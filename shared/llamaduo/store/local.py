"""The directory store (`file://`), the embedded default."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from llamaduo.contract.artifacts import ArtifactRef
from llamaduo.store.base import (
    ArtifactError,
    ArtifactMissing,
    ArtifactOutsideStore,
    ArtifactStore,
    check_key,
    sha256_of_file,
    verify,
)


class StoreFull(ArtifactError):
    """The disk under the store is full."""

    reason = "store_full"


def path_from_file_uri(uri: str) -> Path:
    """The local path of a `file://` URI (or of a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else uri))
    raise ValueError(f"not a file URI: {uri}")


def _atomic_copy(source: Path, dest: Path, uri: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
    try:
        with source.open("rb") as src, temp.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        temp.replace(dest)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(uri, "no space left on the device holding the artifact store") from exc
        raise


class LocalStore(ArtifactStore):
    """Objects as files under a root directory; writes go to a temp file and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise ArtifactOutsideStore(key, f"key escapes the store root {self.root}: {key!r}")
        return path

    def _confined(self, uri: str) -> Path:
        """The path of a `file://` URI from an event, refused unless it lies inside the store's root directory.

        Symlinks are resolved first, so a link inside the root that points out of it is refused too.
        """
        parsed = urlparse(uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ArtifactOutsideStore(uri, f"not a file:// URI of this store (root {self.root})")
        raw = unquote(parsed.path)
        if "\x00" in raw or ".." in raw.split("/"):
            raise ArtifactOutsideStore(uri, f"URI escapes the store root {self.root}")
        path = Path(raw).resolve()
        if self.root not in path.parents:
            raise ArtifactOutsideStore(uri, f"URI escapes the store root {self.root}")
        return path

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_file(self, key: str, path: Path, media_type: str = "application/octet-stream") -> ArtifactRef:
        dest = self._path(key)
        uri = dest.as_uri()
        _atomic_copy(path, dest, uri)
        return ArtifactRef(uri=uri, sha256=sha256_of_file(dest), size=dest.stat().st_size, media_type=media_type)

    def head(self, key: str, media_type: str = "application/octet-stream") -> ArtifactRef | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return ArtifactRef(
            uri=path.as_uri(), sha256=sha256_of_file(path), size=path.stat().st_size, media_type=media_type
        )

    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        source = self._confined(ref.uri)
        if not source.is_file():
            raise ArtifactMissing(ref.uri, "artifact does not exist")
        _atomic_copy(source, dest, dest.as_uri())
        try:
            verify(ref, sha256_of_file(dest))
        except ArtifactError:
            dest.unlink(missing_ok=True)
            raise
        return dest

    def read_uri(self, uri: str) -> bytes:
        path = self._confined(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactMissing(uri, "artifact does not exist") from exc
        except IsADirectoryError as exc:
            raise ArtifactMissing(uri, "artifact is a directory, not a file") from exc
