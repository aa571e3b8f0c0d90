"""Turning `NAME=PATH` adapter arguments into local adapter directories."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from llamaduo.store import path_from_file_uri
from llamaduo.store.archive import unpack_dir


def materialise_adapters(specs: Sequence[str], cache: Path) -> dict[str, Path]:
    """Map each `NAME=PATH` to a directory holding `adapter_config.json` (tars are unpacked into `cache`)."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, location = spec.partition("=")
        if not sep or not name or not location:
            raise ValueError(f"--adapter expects NAME=PATH, got {spec!r}")
        path = path_from_file_uri(location)
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            target = cache / f"{name}-{digest}"
            if not (target / "adapter_config.json").is_file():
                unpack_dir(path, target)
            path = target
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"adapter {name!r}: {location} is neither a PEFT adapter directory nor an adapter tar")
        adapters[name] = path
    return adapters
