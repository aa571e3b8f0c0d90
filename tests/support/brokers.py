"""Real external buses for the bridge tests: rabbitmq-server, redis-server and mosquitto as our own child processes.

Each listens on a free loopback port with its data in a temporary directory and is started once per test session
(RabbitMQ takes several seconds to boot). The Debian packages `rabbitmq-server redis-server mosquitto` must be
installed (`.ci/run` does it); a test whose broker is missing is skipped with the package to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from llamaduo.bus.provisioning import EVENTS_STREAM, provision
from llamaduo.bus.publisher import Publisher
from llamaduo.bus.settings import BusSettings
from llamaduo.contract import (
    ArtifactRef,
    MetricSummary,
    MigrationCancel,
    MigrationGraduated,
    MigrationRequested,
    MigrationSpec,
    Spend,
    subject_for,
)
from llamaduo.embedded.nats_server import free_port, wait_for_port

T = TypeVar("T")

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


@dataclass
class BrokerProcess:
    """A broker child process, the URL clients use, and where its log goes."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_file: Path

    def stop(self) -> None:
        """SIGTERM the broker's process group, SIGKILL it if it lingers."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the broker's log, for failure messages."""
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""


def _spawn(
    name: str,
    args: list[str],
    port: int,
    url: str,
    workdir: Path,
    env: dict[str, str] | None = None,
    boot_s: float = 30,
) -> BrokerProcess:
    log_file = workdir / f"{name}.log"
    out = log_file.open("ab")
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
    broker = BrokerProcess(name, url, port, process, log_file)
    try:
        wait_for_port(port, timeout=boot_s)
    except TimeoutError:
        broker.stop()
        raise RuntimeError(f"{name} did not listen on {port} within {boot_s}s:\n{broker.log_tail()}") from None
    return broker


def _require(binary: str, package: str) -> str:
    found = shutil.which(binary) or (binary if Path(binary).exists() else None)
    if found is None:
        pytest.skip(f"{binary} is not installed: apt-get install -y {package}")
    return found


def start_redis(workdir: Path) -> BrokerProcess:
    """redis-server without persistence on a free loopback port."""
    binary = _require("redis-server", "redis-server")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return _spawn("redis", [*args, "--dir", str(workdir)], port, f"redis://127.0.0.1:{port}", workdir)


def start_mosquitto(workdir: Path) -> BrokerProcess:
    """mosquitto (MQTT 5 and 3.1.1) with anonymous access on a free loopback port; sessions kept in memory."""
    binary = _require("mosquitto", "mosquitto")
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stdout\n")
    return _spawn("mosquitto", [binary, "-c", str(config)], port, f"mqtt://127.0.0.1:{port}", workdir)


def start_rabbitmq(workdir: Path) -> BrokerProcess:
    """rabbitmq-server as our own node (own epmd port, cookie, data and logs), no plugins, guest allowed."""
    binary = _require(RABBITMQ_SERVER, "rabbitmq-server")
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    (workdir / "enabled_plugins").write_text("[].\n")
    (workdir / "rabbitmq.conf").write_text("loopback_users = none\n")
    env = {
        **os.environ,
        "HOME": str(home),
        "RABBITMQ_NODENAME": f"llamaduo-test-{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
        "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
    }
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    return _spawn("rabbitmq", [binary], port, url, workdir, env=env, boot_s=90)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One redis-server for the session."""
    broker = start_redis(tmp_path_factory.mktemp("redis"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One mosquitto for the session."""
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One rabbitmq-server for the session (it boots in seconds, not milliseconds)."""
    broker = start_rabbitmq(tmp_path_factory.mktemp("rabbitmq"))
    yield broker
    broker.stop()


# ---------------------------------------------------------------------------------------------------------------
# The NATS side of the bridge tests: a scripted coordinator that answers each request (read from the events stream
# through its own durable consumer, as the real coordinator does) with `migration.graduated`, and counts requests,
# so a redelivered request that slipped past JetStream's dedup would show as a second one.
# ---------------------------------------------------------------------------------------------------------------


def make_request(migration_id: str) -> MigrationRequested:
    """A valid migration request."""
    spec = MigrationSpec.model_validate(
        {
            "migration_id": migration_id,
            "task": {"name": "commit messages", "description": "One line, imperative."},
            "coverage": {"uri": "file:///data/coverage.jsonl"},
        }
    )
    return MigrationRequested(migration_id=migration_id, spec=spec)


def graduated_for(migration_id: str) -> MigrationGraduated:
    """What the scripted coordinator answers."""
    summary = MetricSummary(mean=92.0, median=93.0, share_ge_50=1.0, share_ge_70=0.9, judged=8)
    return MigrationGraduated(
        migration_id=migration_id,
        iteration=0,
        adapter=ArtifactRef(uri=f"file:///artifacts/{migration_id}/adapter.tar", sha256="0" * 64, size=1),
        base_model="tiny",
        scores={"similarity": summary, "precision": summary},
        thresholds={"similarity": 90.0, "precision": 90.0},
        spend=Spend(),
    )


class ScriptedCoordinator:
    """Answers every `migration.requested` on the events stream with `migration.graduated`."""

    def __init__(self, nats_url: str, user: str | None = None, password: str | None = None) -> None:
        self.settings = BusSettings(nats_url=nats_url, nats_user=user, nats_password=password)
        self.requests: dict[str, list[str]] = {}
        self.cancels: dict[str, list[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._nc: NatsClient | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> ScriptedCoordinator:
        self._nc = await nats.connect(
            **self.settings.connect_options(),  # type: ignore[arg-type]
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
        )
        js = self._nc.jetstream()
        await provision(js, self.settings)
        publisher = Publisher(js, "scripted-coordinator", self.settings)
        durable = f"scripted-coordinator-{uuid.uuid4().hex[:8]}"
        await js.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name=durable,
                filter_subjects=[subject_for(MigrationRequested), subject_for(MigrationCancel)],
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
        sub = await js.pull_subscribe_bind(durable=durable, stream=EVENTS_STREAM)

        async def loop() -> None:
            # The flag, not only the cancel: Python 3.11's wait_for (inside nats-py's fetch) can swallow a cancel
            # that lands as its timeout fires, and a loop relying on the cancel then runs forever (seen once in CI).
            while not self._stopping.is_set():
                try:
                    batch = await sub.fetch(10, timeout=0.5)
                except NatsTimeoutError:
                    continue
                except Exception:  # NATS is down (an outage test): wait for the reconnect
                    await asyncio.sleep(0.2)
                    continue
                for msg in batch:
                    ce_id = (msg.headers or {}).get("ce-id", "")
                    if msg.subject == subject_for(MigrationCancel):
                        cancel = MigrationCancel.model_validate_json(msg.data)
                        self.cancels.setdefault(cancel.migration_id, []).append(ce_id)
                    else:
                        request = MigrationRequested.model_validate_json(msg.data)
                        self.requests.setdefault(request.migration_id, []).append(ce_id)
                        await publisher.publish(graduated_for(request.migration_id))
                    await msg.ack()

        self._task = asyncio.create_task(loop())
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._nc is not None:
            await self._nc.close()

    async def stream_requests(self, migration_id: str) -> int:
        """How many `migration.requested` for `migration_id` the events stream holds."""
        assert self._nc is not None
        js = self._nc.jetstream()
        sub = await js.pull_subscribe(
            subject_for(MigrationRequested), stream=EVENTS_STREAM, config=ConsumerConfig(inactive_threshold=5)
        )
        count = 0
        try:
            while True:
                try:
                    batch = await sub.fetch(100, timeout=0.5)
                except NatsTimeoutError:
                    break
                for msg in batch:
                    count += MigrationRequested.model_validate_json(msg.data).migration_id == migration_id
                    await msg.ack()
        finally:
            await sub.unsubscribe()
        return count


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30.0) -> T:
    """Poll `check` until it returns something (not None); fail naming `what` after `timeout` (a hang guard)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value is not None:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def reaches(read: Callable[[], int], value: int, what: str) -> None:
    """Wait until a counter reads `value` (counters move just after the bus has the message)."""

    async def check() -> bool | None:
        return True if read() == value else None

    await eventually(check, f"{what} == {value} (now {read()})")


SEPARATORS = {"kafka": ".", "rabbitmq": ".", "redis": ":", "mqtt": "/"}
"""How each bus's names are usually segmented."""


def private_bridge_settings(bus: str, url: str, nats_url: str, **extra: Any) -> Any:
    """`BridgeSettings` for a bridge of its own in a shared broker: a fresh name, its own inbound, outbound and
    dead-letter names, and quick retries."""
    from llamaduo_bridge.settings import BridgeSettings

    name, sep = uuid.uuid4().hex[:8], SEPARATORS[bus]
    options: dict[str, Any] = {"bridge_retry_max_s": 0.5, "publish_timeout_s": 1.0, **extra}
    return BridgeSettings(
        bridge_bus=bus,  # type: ignore[arg-type]
        bridge_url=url,
        nats_url=nats_url,
        bridge_name=name,
        bridge_inbound=f"requests{sep}{name}",
        bridge_outbound=f"events{sep}{name}",
        bridge_dead_letter=f"dlq{sep}{name}",
        **options,
    )


@contextlib.asynccontextmanager
async def running_bridge(settings: Any) -> AsyncIterator[Any]:
    """A started bridge (its outbound consumer exists before it takes anything), stopped afterwards."""
    from llamaduo_bridge.app import Bridge

    bridge = Bridge(settings)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()
