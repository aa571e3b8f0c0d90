"""The bridge installs with every bus driver it speaks and without the model stack (its image carries no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"}


def test_the_bridge_brings_its_bus_drivers_and_no_torch(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    subprocess.run(
        [*pip, "--report", str(report), str(ROOT / "shared"), str(ROOT / "services" / "bridge")],
        check=True,
        capture_output=True,
    )
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"llamaduo-bridge", "faststream", "aiokafka", "aio-pika", "redis", "zmqtt", "nats-py"} <= names
    assert not names & HEAVY, f"the bridge would install {sorted(names & HEAVY)}"
