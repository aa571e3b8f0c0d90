"""`llamaduo.localmodel`: resolving, converting, loading and building local models."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationMixin

from llamaduo.localmodel import (
    CHATML_TEMPLATE,
    LocalModelSettings,
    build_tiny_model,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_base_model,
)
from llamaduo.localmodel.atomic import build_dir_atomically, is_complete_model_dir

BUNDLED = "bundled:smollm2-135m-instruct"


def _write_fake_model(dest: Path, log: Path) -> None:
    with log.open("a") as handle:
        handle.write(f"{os.getpid()}\n")
    # Long enough that the second process surely arrives while the first is still building.
    time.sleep(1.0)
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        (dest / name).write_text("{}")


def _build_fake(target: str, log: str) -> str:
    return str(build_dir_atomically(Path(target), lambda tmp: _write_fake_model(tmp, Path(log))))


def _resolve_bundled(cache: str) -> str:
    return str(resolve_base_model(BUNDLED, Path(cache)))


def test_concurrent_builds_run_once_and_leave_one_directory(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"
    log = tmp_path / "builds.log"
    # fork: the children only write files, and skip re-importing torch as spawned ones would.
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.starmap(_build_fake, [(str(target), str(log)), (str(target), str(log))])
    assert results == [str(target), str(target)]
    assert len(log.read_text().split()) == 1, "the second process must wait for the first, not build again"
    assert is_complete_model_dir(target)
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["model"]


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def explode(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_dir_atomically(tmp_path / "model", explode)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_an_incomplete_build_is_refused(tmp_path: Path) -> None:
    def config_only(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")

    with pytest.raises(RuntimeError, match="incomplete"):
        build_dir_atomically(tmp_path / "model", config_only)
    assert not (tmp_path / "model").exists()


def test_a_missing_local_directory_is_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_base_model(str(missing), tmp_path / "cache")


def test_a_directory_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(FileNotFoundError, match=r"weights-only.*config\.json"):
        resolve_base_model(str(tmp_path / "weights-only"), tmp_path / "cache")


def test_a_local_model_directory_is_returned_as_is(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(tiny_model_dir), tmp_path / "cache") == tiny_model_dir


def test_hub_ids_pass_through_untouched(tmp_path: Path) -> None:
    assert resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not any(tmp_path.iterdir())


def test_unknown_bundled_names_list_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bundled:smollm2-135m-instruct"):
        resolve_base_model("bundled:gpt-5", tmp_path)


def test_settings_come_from_llamaduo_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLAMADUO_MODEL_CACHE", raising=False)
    monkeypatch.delenv("LLAMADUO_DEVICE", raising=False)
    assert LocalModelSettings().model_cache == Path("~/.cache/llamaduo/models").expanduser()
    assert LocalModelSettings().device == "auto"
    monkeypatch.setenv("LLAMADUO_MODEL_CACHE", str(tmp_path))
    monkeypatch.setenv("LLAMADUO_DEVICE", "cpu")
    settings = LocalModelSettings()
    assert (settings.model_cache, settings.device) == (tmp_path, "cpu")


def test_pick_device() -> None:
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            pick_device("cuda")


def test_tokenizer_has_pad_token_and_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token is not None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_a_tokenizer_without_template_gets_chatml(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_causal_lm_uses_fp32_on_cpu_unless_told(tiny_model_dir: Path) -> None:
    model = load_causal_lm(tiny_model_dir, "cpu")
    assert model.dtype == torch.float32
    assert not model.training
    assert load_causal_lm(tiny_model_dir, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_tiny_model_shape_and_seeded_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny_model_dir, "cpu")
    config = model.config
    tokenizer = load_tokenizer(tiny_model_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        64,
        2,
        4,
        128,
    )
    assert config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    again = build_tiny_model(tmp_path / "again", tiny_model_dir)
    first = load_file(tiny_model_dir / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.slow
def test_bundled_model_converts_into_a_directory_that_reloads(smollm2_dir: Path) -> None:
    assert is_complete_model_dir(smollm2_dir)
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_causal_lm(smollm2_dir, "cpu")
    assert isinstance(model, GenerationMixin)
    assert model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in str(tokenizer.chat_template)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_two_processes_converting_at_once_yield_one_valid_directory(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        results = pool.map(_resolve_bundled, [str(cache), str(cache)])
    target = cache / "smollm2-135m-instruct"
    assert results == [str(target), str(target)]
    assert sorted(p.name for p in cache.iterdir()) == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]
    assert is_complete_model_dir(target)
    assert load_tokenizer(target).eos_token == "<|im_end|>"
