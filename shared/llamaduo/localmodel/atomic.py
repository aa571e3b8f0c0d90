"""Building a cache directory exactly once, safely across concurrent processes."""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

REQUIRED_MODEL_FILES = ("config.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_complete_model_dir(path: Path) -> bool:
    """Return whether `path` holds a saved model: config, tokenizer config and safetensors weights."""
    return (
        path.is_dir()
        and all((path / name).is_file() for name in REQUIRED_MODEL_FILES)
        and any((path / name).is_file() for name in WEIGHT_FILES)
    )


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_dir_atomically(
    target: Path,
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool] = is_complete_model_dir,
) -> Path:
    """Return `target`, first filling it with `build(tmp_dir)` and renaming it into place if it is missing.

    A `fcntl` lock beside the target makes a second process wait for the first instead of building again; the
    build happens in a temporary directory beside the target so that a crash never leaves a half-written target.
    """
    target = target.expanduser()
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):
            return target
        # Holding the lock means no cooperating process is building now: leftovers are from crashed builds.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            logger.warning("removing incomplete cache directory %s", target)
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            # mkdtemp makes the directory private; a shared model cache must be readable by everyone.
            tmp.chmod(0o755)
            build(tmp)
            for path in tmp.rglob("*"):
                if path.is_file():
                    path.chmod(0o644)
            if not is_complete(tmp):
                raise RuntimeError(f"building {target} produced an incomplete directory")
            try:
                tmp.rename(target)
            except OSError:
                # Only a process that ignores the lock (e.g. on a filesystem without flock) can get here first.
                if not is_complete(target):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
