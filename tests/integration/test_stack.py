"""The embedded stack's supervision: crashed services are restarted, nothing outlives the supervisor."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamaduo.embedded.stack import STACK_FILE, Stack, StackConfig

pytestmark = pytest.mark.integration
NO_LLM = "http://127.0.0.1:9/v1"  # the coordinator never calls the service LLM


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_crashed_service_is_restarted_then_reported_when_it_keeps_dying(tmp_path):
    config = StackConfig(state_dir=tmp_path, service_llm_base_url=NO_LLM, services=("coordinator",), max_restarts=1)
    with Stack(config) as stack:
        child = stack.children[0]
        first = child.process.pid
        child.process.kill()
        child.process.wait()
        stack.check()
        assert child.restarts == 1 and child.process.pid != first and alive(child.process.pid)
        child.process.kill()
        child.process.wait()
        with pytest.raises(RuntimeError, match=r"coordinator keeps exiting .*coordinator.log"):
            stack.check()
    assert not (tmp_path / STACK_FILE).exists()


def test_nothing_outlives_a_supervisor_killed_with_sigkill(tmp_path):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from llamaduo.embedded.stack import Stack, StackConfig\n"
        f"Stack(StackConfig(state_dir=Path({str(tmp_path)!r}), service_llm_base_url={NO_LLM!r},"
        " services=('coordinator',))).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert supervisor.stdout.readline().strip() == "up"
    info = json.loads((tmp_path / STACK_FILE).read_text())
    children = list(info["children"].values())
    nats_pid = int(
        subprocess.run(["pgrep", "-f", "--", f"-sd {tmp_path}/nats"], capture_output=True, text=True).stdout.split()[0]
    )
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(pid) for pid in [*children, nats_pid]):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in [*children, nats_pid])
