"""What an adapter manifest records about the run: the base model's fingerprint, library versions, peak memory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import resource
import sys
from pathlib import Path

import torch

from llamaduo_trainer.models import is_local

FULL_HASH_LIMIT_BYTES = 2 * 1024**3
"""Weight files are hashed in full when they add up to less than this; above, by name and size only."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries training depends on (bitsandbytes only when installed)."""
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _weight_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES))


def directory_fingerprint(directory: Path) -> dict[str, str]:
    """sha256 over config.json and the weight files' names and sizes, and their bytes when under ~2 GB in all."""
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(b"config.json\0" + config.read_bytes())
    files = _weight_files(directory)
    total = sum(path.stat().st_size for path in files)
    full = total < FULL_HASH_LIMIT_BYTES
    for path in files:
        digest.update(f"\0{path.relative_to(directory).as_posix()}\0{path.stat().st_size}".encode())
        if full:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return {
        "sha256": digest.hexdigest(),
        "hashed": "config, weight names, sizes and contents" if full else "config, weight names and sizes",
        "weight_bytes": str(total),
    }


def base_model_fingerprint(base_model: Path | str) -> dict[str, str]:
    """For the manifest: the id given, and a sha256 over config.json + the weight files' names and sizes (and their
    contents when under ~2 GB), or, for a hub id, also the commit of the cached snapshot (`commit`).
    """
    fingerprint = {"id": str(base_model)}
    if is_local(base_model):
        directory = Path(base_model).expanduser()
        if directory.is_dir():
            fingerprint.update(directory_fingerprint(directory))
        return fingerprint
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(str(base_model), local_files_only=True))
    except Exception as exc:  # any hub error means: not in the cache
        fingerprint["commit"] = f"unknown: not in the local cache ({type(exc).__name__})"
        return fingerprint
    # The snapshot folder is named after the commit the cache holds.
    fingerprint["commit"] = snapshot.name
    fingerprint.update(directory_fingerprint(snapshot))
    return fingerprint


def reset_peak_memory(device: str) -> None:
    """Start a fresh CUDA peak (CPU runs report the process's lifetime peak RSS; it cannot be reset)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_bytes(device: str) -> int:
    """CUDA max allocated since `reset_peak_memory`, or the process's peak resident set size on a CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


__all__ = [
    "base_model_fingerprint",
    "directory_fingerprint",
    "library_versions",
    "peak_memory_bytes",
    "reset_peak_memory",
]
