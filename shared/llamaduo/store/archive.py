"""Directories as single artifacts: an uncompressed tar with safe extraction."""

from __future__ import annotations

import tarfile
from pathlib import Path

TAR_MEDIA_TYPE = "application/x-tar"


def pack_dir(source: Path, dest: Path) -> Path:
    """Write the files of `source` into the tar `dest`, with relative, sorted names (deterministic order)."""
    with tarfile.open(dest, "w") as tar:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(source)))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    return dest


def unpack_dir(archive: Path, dest: Path) -> Path:
    """Extract a tar made by `pack_dir` into `dest`, refusing links and paths that escape it."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r") as tar:
        tar.extractall(dest, filter="data")
    return dest
