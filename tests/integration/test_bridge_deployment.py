"""`llamaduo-bridge` run the way docker-compose.yml runs it: its own OS process, configured only by the environment
compose gives the `bridge-redis` container, as the NATS user `bridge` under deploy/nats's permissions.

Only what names the compose network moves onto loopback: `nats` becomes a nats-server started from deploy/nats,
`redis` a real redis-server. A plain redis client starts a migration by appending to the default request stream;
a scripted coordinator (as `admin`) answers, and `graduated` comes back on the default events stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError
from redis.asyncio import Redis

from llamaduo.bus.provisioning import EVENTS_STREAM
from llamaduo.contract import encode
from llamaduo.embedded.nats_server import free_port
from tests.support.brokers import BrokerProcess, ScriptedCoordinator, eventually, make_request, redis_server
from tests.support.deployment import COMPOSE_FILE, PermissionedNats, load_yaml, nats_environment, service_environment

__all__ = ["redis_server"]
pytestmark = pytest.mark.integration
SCRIPTS = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    return load_yaml(COMPOSE_FILE)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def permissioned_nats(
    compose: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PermissionedNats]:
    server = PermissionedNats(tmp_path_factory.mktemp("bridge-nats") / "store", nats_environment(compose))
    with server:
        yield server


@pytest.fixture(scope="module")
async def coordinator(
    permissioned_nats: PermissionedNats, compose: dict[str, object]
) -> AsyncIterator[ScriptedCoordinator]:
    admin = service_environment(compose, "provision", {})  # type: ignore[arg-type]
    scripted = await ScriptedCoordinator(
        permissioned_nats.url(), admin["LLAMADUO_NATS_USER"], admin["LLAMADUO_NATS_PASSWORD"]
    ).start()
    yield scripted
    await scripted.stop()


@pytest.fixture
def bridge_process(
    compose: dict[str, object],
    permissioned_nats: PermissionedNats,
    redis_server: BrokerProcess,
    coordinator: ScriptedCoordinator,
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], Path, dict[str, str]]]:
    env = service_environment(compose, "bridge-redis", {})  # type: ignore[arg-type]
    assert env["LLAMADUO_NATS_URL"] == "nats://nats:4222" and env["LLAMADUO_BRIDGE_URL"] == "redis://redis:6379"
    assert env["LLAMADUO_HEALTH_PORT"] == "8080"
    env.update(
        LLAMADUO_NATS_URL=permissioned_nats.url(),
        LLAMADUO_BRIDGE_URL=redis_server.url,
        LLAMADUO_HEALTH_PORT=str(free_port()),
    )
    log = tmp_path / "bridge.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(SCRIPTS / "llamaduo-bridge")],
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield process, log, env
    if process.poll() is None:
        process.kill()
        process.wait()


async def test_the_compose_bridge_runs_a_redis_request_to_graduated_under_its_nats_permissions(
    bridge_process: tuple[subprocess.Popen[bytes], Path, dict[str, str]],
    redis_server: BrokerProcess,
    permissioned_nats: PermissionedNats,
    coordinator: ScriptedCoordinator,
) -> None:
    process, log, env = bridge_process
    redis = Redis.from_url(redis_server.url)
    password = coordinator.settings.nats_password
    assert password is not None
    admin = await nats.connect(permissioned_nats.url(), user="admin", password=password.get_secret_value())
    try:

        async def ready() -> bool | None:
            assert process.poll() is None, log.read_text()
            try:
                await admin.jetstream().consumer_info(EVENTS_STREAM, "bridge-redis-default")
                groups = await redis.xinfo_groups("llamaduo:requests")
            except (NotFoundError, Exception):
                return None
            return True if any(g["name"] == b"llamaduo-bridge-default" for g in groups) else None

        await eventually(ready, "the bridge's NATS consumer and Redis consumer group")
        await redis.xadd("llamaduo:requests", {"ce_id": "compose-req-1", "data": encode(make_request("compose-1"))})

        async def graduated() -> dict[bytes, bytes] | None:
            for _, fields in await redis.xrange("llamaduo:events"):
                if json.loads(fields[b"data"])["migration_id"] == "compose-1":
                    return fields  # type: ignore[no-any-return]
            return None

        fields = await eventually(graduated, "graduated on llamaduo:events")
        assert fields[b"ce_type"] == b"io.llamaduo.v1.migration.graduated"
        assert coordinator.requests["compose-1"] == ["compose-req-1"]
        # The compose file's own health check, pointed at the port this process got.
        test = load_yaml(COMPOSE_FILE)["services"]["bridge-redis"]["healthcheck"]["test"]
        port = env["LLAMADUO_HEALTH_PORT"]
        check = [sys.executable, *(arg.replace(":8080/", f":{port}/") for arg in test[2:])]
        probe = await asyncio.create_subprocess_exec(*check)
        assert await asyncio.wait_for(probe.wait(), 30) == 0
    finally:
        await redis.aclose()
        await admin.close()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    published = [line for line in lines if line["msg"] == "published on NATS"]
    assert published and published[0]["event_id"] == "compose-req-1"
    assert published[0]["migration_id"] == "compose-1" and published[0]["service"] == "bridge"
    assert "Violation" not in permissioned_nats.log(), "the bridge needed more than its NATS permissions allow"
