"""Each service installs with only what it needs: the API-bound services pull no torch or transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"}


def resolved(*projects: str, tmp_path: Path) -> set[str]:
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
        + [str(ROOT / p) for p in projects],
        check=True,
        capture_output=True,
    )
    return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("service", ["coordinator", "synthesizer", "judge"])
def test_api_bound_services_install_without_torch(service, tmp_path):
    names = resolved("shared", f"services/{service}", tmp_path=tmp_path)
    assert f"llamaduo-{service}" in names and "faststream" in names
    assert not names & HEAVY, f"{service} would install {sorted(names & HEAVY)}"


def test_the_trainer_brings_the_model_stack(tmp_path):
    names = resolved("shared[local-model]", "services/trainer", tmp_path=tmp_path)
    assert {"torch", "transformers", "peft", "trl"} <= names
