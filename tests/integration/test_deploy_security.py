"""The secured bus and the ops endpoints against a real nats-server started from deploy/nats.

- A service that publishes outside its own subjects is refused by the server: the client sees the permissions
  violation (error callback, no PubAck) and nothing reaches the stream; its own subjects still work.
- TLS: the deployment's TLS config with test certificates; a service's settings from compose + the TLS override
  connect, a client without a certificate or without TLS does not.
- `/health` answers 200 with the broker's real round trip while NATS is up and 503 once it is gone.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from llamaduo.bus import BusSettings, provision_bus
from llamaduo.bus.provisioning import EVENTS_STREAM
from llamaduo.embedded.nats_server import NatsServer
from llamaduo.ops import BrokerProbe, OpsServer
from tests.support.deployment import (
    COMPOSE_FILE,
    DEPLOY,
    NATS_TLS_CONFIG,
    PermissionedNats,
    load_yaml,
    nats_environment,
    service_environment,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def settings_for(user: str, server: PermissionedNats, **extra: Any) -> BusSettings:
    """The NATS settings compose gives `user`'s container (the provisioning job for admin), host moved."""
    service = {"admin": "provision", "bridge": "bridge-kafka"}.get(user, user)
    env = service_environment(load_yaml(COMPOSE_FILE), service, {})
    assert env["LLAMADUO_NATS_USER"] == user
    return BusSettings(
        nats_url=extra.pop("nats_url", server.url()),
        nats_user=env["LLAMADUO_NATS_USER"],
        nats_password=env["LLAMADUO_NATS_PASSWORD"],
        nats_inbox_prefix=env.get("LLAMADUO_NATS_INBOX_PREFIX", "_INBOX"),
        **extra,
    )


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[PermissionedNats]:
    with PermissionedNats(tmp_path / "nats", nats_environment(load_yaml(COMPOSE_FILE))) as server:
        await provision_bus(settings_for("admin", server))
        yield server


async def connect_collecting(settings: BusSettings) -> tuple[nats.NATS, list[Exception]]:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(**settings.connect_options(), error_cb=on_error)  # type: ignore[arg-type]
    return nc, errors


async def reported(errors: list[Exception], text: str, wait_s: float = 10.0) -> None:
    """Wait (bounded) until the client's error callback got an error containing `text`."""
    for _ in range(int(wait_s / 0.05)):
        if any(text in str(e).lower() for e in errors):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no error containing {text!r}; got {[str(e) for e in errors]}")


async def test_a_service_publishing_outside_its_subjects_is_denied(secured: PermissionedNats) -> None:
    nc, errors = await connect_collecting(settings_for("judge", secured))
    js = nc.jetstream(timeout=1)
    try:
        # Its own output: accepted, acknowledged by the stream.
        ack = await js.publish("llamaduo.v1.evaluation.completed", b"{}", stream=EVENTS_STREAM, timeout=2)
        assert ack.stream == EVENTS_STREAM
        # Somebody else's: the coordinator alone may graduate a migration.
        with pytest.raises((NatsTimeoutError, NatsError)):
            await js.publish("llamaduo.v1.migration.graduated", b"{}", stream=EVENTS_STREAM, timeout=1)
        # Nor may it take the trainer's work or touch the stream.
        trainers = await js.pull_subscribe_bind("trainer", stream=EVENTS_STREAM)
        with pytest.raises((NatsTimeoutError, NatsError)):
            await trainers.fetch(1, timeout=1)
        with pytest.raises((NatsTimeoutError, NatsError)):
            await js.delete_stream(EVENTS_STREAM)
        await nc.subscribe("_INBOX.>")  # other services' replies
        await nc.flush()
        # The server's -ERR lines reach the error callback asynchronously.
        await reported(errors, 'permissions violation for publish to "llamaduo.v1.migration.graduated"')
        await reported(errors, 'permissions violation for subscription to "_inbox.>"')
    finally:
        await nc.close()
    log = secured.log()
    assert 'user:judge" - Publish Violation - Subject "llamaduo.v1.migration.graduated"' in log
    assert 'user:judge" - Publish Violation - Subject "$JS.API.STREAM.DELETE.LLAMADUO_EVENTS"' in log
    assert 'user:judge" - Publish Violation - Subject "$JS.API.CONSUMER.MSG.NEXT.LLAMADUO_EVENTS.trainer"' in log

    admin = await nats.connect(**settings_for("admin", secured).connect_options())  # type: ignore[arg-type]
    try:
        js = admin.jetstream()
        with pytest.raises(NotFoundError):
            await js.get_last_msg(EVENTS_STREAM, "llamaduo.v1.migration.graduated")
        assert (await js.get_last_msg(EVENTS_STREAM, "llamaduo.v1.evaluation.completed")).data == b"{}"
        assert (await js.stream_info(EVENTS_STREAM)).config.name == EVENTS_STREAM
    finally:
        await admin.close()


async def test_the_bridge_submits_migrations_but_cannot_take_a_services_work(secured: PermissionedNats) -> None:
    nc, errors = await connect_collecting(settings_for("bridge", secured))
    js = nc.jetstream()
    try:
        await js.publish("llamaduo.v1.migration.requested", b"{}", stream=EVENTS_STREAM, timeout=2)
        mine = await js.pull_subscribe("llamaduo.v1.>", durable="bridge-kafka", stream=EVENTS_STREAM)
        assert len(await mine.fetch(1, timeout=2)) == 1
        with pytest.raises((NatsTimeoutError, NatsError)):
            await js.publish("llamaduo.v1.dataset.ready", b"{}", stream=EVENTS_STREAM, timeout=1)
        stolen = await js.pull_subscribe_bind("judge", stream=EVENTS_STREAM)
        with pytest.raises((NatsTimeoutError, NatsError)):
            await stolen.fetch(1, timeout=1)
        await nc.flush()
        await reported(errors, 'permissions violation for publish to "llamaduo.v1.dataset.ready"')
    finally:
        await nc.close()
    assert 'user:bridge" - Publish Violation - Subject "$JS.API.CONSUMER.MSG.NEXT.LLAMADUO_EVENTS.judge"' in (
        secured.log()
    )


def make_certs(folder: Path) -> Path:
    subprocess.run([sys.executable, str(DEPLOY / "nats" / "gen-certs.py"), str(folder)], check=True)
    return folder


async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "tls")
    env = nats_environment(load_yaml(COMPOSE_FILE)) | {
        "NATS_TLS_CA_FILE": str(certs / "ca.pem"),
        "NATS_TLS_CERT_FILE": str(certs / "server-cert.pem"),
        "NATS_TLS_KEY_FILE": str(certs / "server-key.pem"),
    }
    tls_env = load_yaml(DEPLOY / "compose.tls.yml")["x-tls-env"]
    secrets = {"/run/secrets/nats-ca": "ca.pem", "/run/secrets/nats-client-cert": "client-cert.pem"}
    secrets["/run/secrets/nats-client-key"] = "client-key.pem"
    files = {key: str(certs / secrets[value]) for key, value in tls_env.items() if value in secrets}
    with PermissionedNats(tmp_path / "nats", env, config=NATS_TLS_CONFIG) as server:
        url = tls_env["LLAMADUO_NATS_URL"].replace("nats:4222", f"127.0.0.1:{server.port}")
        settings = settings_for(
            "admin",
            server,
            nats_url=url,
            nats_tls_ca_file=files["LLAMADUO_NATS_TLS_CA_FILE"],
            nats_tls_cert_file=files["LLAMADUO_NATS_TLS_CERT_FILE"],
            nats_tls_key_file=files["LLAMADUO_NATS_TLS_KEY_FILE"],
        )
        await provision_bus(settings)  # a full JetStream conversation over TLS
        nc = await nats.connect(**settings.connect_options())  # type: ignore[arg-type]
        report = await BrokerProbe("judge", lambda: nc).check()
        await nc.close()
        assert report.healthy and report.broker["jetstream"]["streams"] == 3  # events, dead letters, state

        no_cert = settings_for("admin", server, nats_url=url, nats_tls_ca_file=files["LLAMADUO_NATS_TLS_CA_FILE"])
        assert not await connects(no_cert), "a client without a certificate got in"
        assert not await connects(settings_for("admin", server)), "a client without TLS got in"


async def connects(settings: BusSettings) -> bool:
    """Whether one connection attempt succeeds (no retries)."""
    try:
        nc = await asyncio.wait_for(
            nats.connect(**settings.connect_options(), allow_reconnect=False, connect_timeout=2),  # type: ignore[arg-type]
            10,
        )
    except Exception:  # the server drops the handshake or the connection; the error type varies
        return False
    await nc.close()
    return True


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as failed:
        return failed.code, json.loads(failed.read())


async def test_health_reports_the_brokers_real_ping_and_503_when_it_is_gone(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    probe = BrokerProbe("judge", lambda: nc)

    async def health() -> tuple[int, str, bytes]:
        report = await probe.check()
        return (200 if report.healthy else 503), "application/json", report.body()

    ops = OpsServer({"/health": health}, "127.0.0.1", 0)
    await ops.start()
    url = f"http://127.0.0.1:{ops.port}/health"
    try:
        status, body = await asyncio.to_thread(get, url)
        assert status == 200 and body["status"] == "ok" and body["service"] == "judge"
        assert body["broker"]["connected"] is True and body["broker"]["rtt_ms"] >= 0
        assert body["broker"]["jetstream"] == {"streams": 0, "consumers": 0}
        server.stop()
        status, body = await asyncio.to_thread(get, url)
        assert status == 503 and body["status"] == "unavailable"
        assert body["broker"]["error"]
        missing = await asyncio.to_thread(get_status, f"http://127.0.0.1:{ops.port}/nope")
        assert missing == 404
    finally:
        await ops.stop()
        await nc.close()
        server.stop()


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as failed:
        return failed.code


async def test_an_attach_only_service_names_the_consumers_nobody_provisioned(tmp_path: Path) -> None:
    from llamaduo.bus.service import NotProvisioned, wait_for_consumers

    with NatsServer(tmp_path / "nats") as server:
        settings = BusSettings(nats_url=server.url, provision_on_start=False, attach_wait_s=0.5)
        with pytest.raises(NotProvisioned, match=r"judge missing on stream LLAMADUO_EVENTS.*llamaduo provision"):
            await wait_for_consumers(settings, ["judge"])
        await provision_bus(BusSettings(nats_url=server.url))
        await wait_for_consumers(settings, ["judge"])  # attaches once provisioned
