"""Fixtures shared by the whole test suite; each group sits under its own header."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamaduo.localmodel import build_tiny_model, resolve_base_model
from llamaduo.store import LocalStore
from tests.support.scripted_llm import ScriptedLLM

# ---------------------------------------------------------------------------------------------------------------
# Local models (llamaduo.localmodel): the bundled SmolLM2 converted to a transformers directory, and a tiny random
# Llama with the same tokenizer. Both live in a cache shared between test runs (LLAMADUO_TEST_MODEL_CACHE, default
# ~/.cache/llamaduo/test-models): converting SmolLM2 takes ~20 s, reusing it ~0 s. Building is atomic and locked,
# so parallel test processes share one copy.
# ---------------------------------------------------------------------------------------------------------------

# huggingface_hub reads this when first imported: set it before any test module imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL_NAME = "tiny-llama-v1"


def cached_test_models() -> Path:
    """Return the directory where test models are cached between runs."""
    return Path(os.environ.get("LLAMADUO_TEST_MODEL_CACHE", "~/.cache/llamaduo/test-models")).expanduser()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a plain transformers directory (converted on first use)."""
    path = resolve_base_model("bundled:smollm2-135m-instruct", cached_test_models())
    assert isinstance(path, Path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path) -> Path:
    """A seeded random 2-layer Llama (hidden 64) with SmolLM2's tokenizer: fast stand-in for real models."""
    return build_tiny_model(cached_test_models() / TINY_MODEL_NAME, smollm2_dir)


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """Run a module's torch work on one intra-op thread, then restore the previous count.

    Tiny-model tensors are far too small to gain from a second thread, and on a busy 2-core machine OpenMP's
    waiting threads make such tests several times slower (measured: 17 s instead of 66 s for the serve and
    generation tests under load). Use it with `pytestmark = pytest.mark.usefixtures("torch_single_thread")`.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# Service-LLM tests: a module defines `shared_server` (a `ScriptedLLM` with its own knobs, started once per module,
# ~0.2 s); `server` hands it to each test reset to its initial state. `store` is a fresh directory store.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def server(shared_server: ScriptedLLM) -> ScriptedLLM:
    """The module's scripted service LLM, reset for this test."""
    shared_server.reset()
    return shared_server


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    """A fresh directory artifact store."""
    return LocalStore(tmp_path / "store")
