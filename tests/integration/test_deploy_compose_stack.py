"""The five services started the way docker-compose.yml starts them, against the deployment's own NATS config.

Each service runs as its own OS process (`llamaduo-<service>`, the image's command) with exactly the environment
the compose file gives its container, read from docker-compose.yml and interpolated like compose does. Only what
names the compose network is moved onto loopback: the host `nats` becomes a real nats-server started from
deploy/nats (one account, a user and permissions per service), `minio` a moto S3 endpoint, `llm` a scripted
service LLM, and each service's health port a free one. The image's own ENV lines (deploy/Dockerfile*) are added,
their paths moved under the test's folder. `provision` runs first, as compose's one-shot service does; then a
migration runs to `graduated`, every service answers its compose health check, and `/metrics` shows the work.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from llamaduo.bus import BusSettings
from llamaduo.client import Client, load_spec
from llamaduo.contract import MigrationSpec
from llamaduo.embedded.nats_server import free_port
from llamaduo.settings import WorkerSettings
from tests.support.deployment import (
    COMPOSE_FILE,
    DEPLOY,
    ROOT,
    SERVICES,
    PermissionedNats,
    load_yaml,
    nats_environment,
    service_environment,
)
from tests.support.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]
EXAMPLE = ROOT / "examples" / "commit-message" / "spec.yaml"
SCRIPTS = Path(sys.executable).parent


def image_env(service: str, work: Path) -> dict[str, str]:
    """The ENV of the service's image (the last stage of its Dockerfile), paths moved under `work`."""
    dockerfile = DEPLOY / ("Dockerfile.torch" if service in ("trainer", "inferencer") else "Dockerfile")
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile.read_bytes()), env_replace=False)
    env: dict[str, str] = {}
    last_stage = max(i for i, item in enumerate(parser.structure) if item["instruction"] == "FROM")
    for item in parser.structure[last_stage:]:
        if item["instruction"] == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', item["value"]):
                env[key] = value.strip('"')
    env["LLAMADUO_SERVICE"] = service
    env.pop("PATH", None)
    for key, value in list(env.items()):
        if value.startswith(("/var/", "/tmp/")):
            env[key] = str(work / value.strip("/").replace("/", "_"))
    return env


def move_host(value: str, host: str, target: str) -> str:
    return re.sub(rf"(?<=[/@]){re.escape(host)}(?=[:/]|$)|^{re.escape(host)}(?=[:/]|$)", target, value)


class ComposeStack:
    """The compose services as local processes."""

    def __init__(self, tmp: Path, nats: PermissionedNats, s3: str, llm: ScriptedLLM) -> None:
        self.tmp = tmp
        self.compose = load_yaml(COMPOSE_FILE)
        self.nats = nats
        self.s3 = s3
        self.llm = llm
        self.health_ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def env_for(self, service: str) -> dict[str, str]:
        env = service_environment(self.compose, service, {})
        llm_host = self.llm.base_url.split("//", 1)[1].split("/", 1)[0]
        for key, value in env.items():
            value = move_host(value, "nats:4222", f"127.0.0.1:{self.nats.port}")
            value = move_host(value, "minio:9000", self.s3)
            env[key] = move_host(value, "llm:8000", llm_host)
        if "LLAMADUO_HEALTH_PORT" in env:
            self.health_ports.setdefault(service, free_port())
            env["LLAMADUO_HEALTH_PORT"] = str(self.health_ports[service])
            env["LLAMADUO_HEALTH_HOST"] = "127.0.0.1"  # the container listens on all of its own interfaces
        return env

    def process_env(self, service: str, image_service: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMADUO_", "OTEL_", "NATS_"))}
        work = self.tmp / "containers" / service
        work.mkdir(parents=True, exist_ok=True)
        # A 2-core test machine runs five services and two torch processes at once.
        speed = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "LLAMADUO_RETRY_BASE_DELAY_S": "0.2"}
        return {**base, **speed, **image_env(image_service, work), **self.env_for(service), "HOME": str(work)}

    def provision(self) -> None:
        spec = self.compose["services"]["provision"]
        image_service = spec["build"]["args"]["SERVICE"]
        command = [str(SCRIPTS / spec["command"][0]), *spec["command"][1:]]
        done = subprocess.run(
            command, env=self.process_env("provision", image_service), capture_output=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]

    def start(self, service: str) -> None:
        log = (self.tmp / f"{service}.log").open("wb")
        self.processes[service] = subprocess.Popen(
            [str(SCRIPTS / f"llamaduo-{service}")],
            env=self.process_env(service, service),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def healthcheck(self, service: str) -> int:
        """Run the compose file's own health check command against the service's process."""
        test = self.compose["services"][service]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python"
        args = [arg.replace(":8080/", f":{self.health_ports[service]}/") for arg in test[2:]]
        return subprocess.run([sys.executable, *args], capture_output=True, timeout=30, check=False).returncode

    def wait_healthy(self, service: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.healthcheck(service) != 0:
            process = self.processes[service]
            assert process.poll() is None, f"{service} exited:\n{self.log(service)[-3000:]}"
            assert time.monotonic() < deadline, f"{service} never healthy:\n{self.log(service)[-3000:]}"
            time.sleep(1.0)

    def metrics(self, service: str) -> str:
        url = f"http://127.0.0.1:{self.health_ports[service]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    def log(self, service: str) -> str:
        return (self.tmp / f"{service}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def compose_stack(tmp_path: Path, s3_endpoint: str) -> Iterator[ComposeStack]:
    compose = load_yaml(COMPOSE_FILE)
    model = service_environment(compose, "coordinator", {})["LLAMADUO_SERVICE_LLM_MODEL"]
    bucket = re.search(r"mc mb --ignore-existing local/(\S+)", " ".join(compose["services"]["minio-init"]["command"]))
    assert bucket is not None
    from minio import Minio

    creds = service_environment(compose, "minio-init", {})
    client = Minio(s3_endpoint, creds["MINIO_ROOT_USER"], creds["MINIO_ROOT_PASSWORD"], secure=False)
    if not client.bucket_exists(bucket.group(1)):
        client.make_bucket(bucket.group(1))  # what the one-shot minio-init does
    with (
        ScriptedLLM(judge_score=70, model=model) as llm,
        PermissionedNats(tmp_path / "nats", nats_environment(compose)) as nats,
    ):
        stack = ComposeStack(tmp_path, nats, s3_endpoint, llm)
        try:
            yield stack
        finally:
            stack.stop()
            for service in stack.processes:
                print(f"--- {service} (tail) ---\n" + "\n".join(stack.log(service).splitlines()[-12:]))
            violations = [line for line in nats.log().splitlines() if "Violation" in line]
            print("--- nats-server permission violations ---\n" + "\n".join(violations[:40]))


def tiny_spec(tiny_model_dir: Path) -> MigrationSpec:
    spec = load_spec(EXAMPLE)
    return spec.model_copy(
        update={
            "base_model": spec.base_model.model_copy(update={"id": str(tiny_model_dir)}),
            "training": spec.training.model_copy(
                update={"epochs": 1, "max_steps": 2, "batch_size": 8, "validation_fraction": 0.1}
            ),
            "inference": spec.inference.model_copy(update={"responses_per_prompt": 1, "max_new_tokens": 6}),
            "evaluation": spec.evaluation.model_copy(update={"thresholds": {"similarity": 60, "precision": 60}}),
        }
    )


def admin_client(stack: ComposeStack) -> tuple[BusSettings, WorkerSettings]:
    """An operator's connection: the compose provisioning job's NATS user, the services' S3 settings."""
    provision = stack.env_for("provision")
    coordinator = stack.env_for("coordinator")
    settings = WorkerSettings(
        nats_url=provision["LLAMADUO_NATS_URL"],
        nats_user=provision["LLAMADUO_NATS_USER"],
        nats_password=provision["LLAMADUO_NATS_PASSWORD"],
        store_url=coordinator["LLAMADUO_STORE_URL"],
        s3_endpoint=coordinator["LLAMADUO_S3_ENDPOINT"],
        s3_access_key=coordinator["LLAMADUO_S3_ACCESS_KEY"],
        s3_secret_key=coordinator["LLAMADUO_S3_SECRET_KEY"],
        s3_secure=coordinator["LLAMADUO_S3_SECURE"] == "true",
    )
    return settings, settings


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_the_compose_services_run_a_migration_to_graduated_under_their_nats_permissions(
    compose_stack: ComposeStack, tiny_model_dir: Path
) -> None:
    stack = compose_stack
    stack.provision()
    for service in SERVICES:
        stack.start(service)
    for service in SERVICES:
        await asyncio.to_thread(stack.wait_healthy, service, 120)

    bus, store = admin_client(stack)
    async with Client(bus, store) as client:
        since = datetime.now(UTC)
        migration_id = await client.submit(tiny_spec(tiny_model_dir), "compose-graduates")
        events = [e async for e in client.follow(migration_id, since, idle_timeout=240)]
        state = await client.status(migration_id)
        report = await client.status_report(migration_id, timeout=5.0)  # answered by the coordinator's own user

    names = [e.name for e in events if e.name != "progress"]
    assert names[-1] == "migration.graduated", names
    assert state is not None and state.status == "graduated"
    assert report is not None and report.source == "coordinator" and report.state.status == "graduated"
    assert "Violation" not in stack.nats.log(), "a service needed more than its NATS permissions allow"

    judge = stack.metrics("judge")
    assert (metric(judge, "llamaduo_stage_duration_seconds_count", service="judge", stage="judging") or 0) >= 1
    assert metric(judge, "llamaduo_queue_pending_messages", consumer="judge") == 0
    assert "faststream_received_messages_total" in judge
    coordinator = stack.metrics("coordinator")
    assert metric(coordinator, "llamaduo_migrations", status="graduated") == 1
    assert metric(coordinator, "llamaduo_service_llm_calls", status="graduated") == state.spend.calls > 0
    # The compose default service LLM is the bundled local one: its calls cost nothing.
    assert metric(coordinator, "llamaduo_spend_usd", status="graduated") == state.spend.usd
    for service in SERVICES:
        assert stack.healthcheck(service) == 0, f"{service} unhealthy after the migration"
    for service in SERVICES:
        for line in stack.log(service).splitlines():
            record = json.loads(line)  # every log line is one JSON object
            assert record["service"] == service
