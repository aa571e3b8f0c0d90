"""Real servers for integration tests: nats-server with JetStream and moto's S3 endpoint, on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamaduo.embedded.nats_server import NatsServer, free_port
from llamaduo.store import LocalStore
from llamaduo.store.s3 import S3Store


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server (file storage) for the whole session."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; yields host:port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


def make_s3_store(endpoint: str, bucket: str) -> S3Store:
    """An S3Store on the moto endpoint (moto accepts any credentials)."""
    from minio import Minio

    client = Minio(endpoint, access_key="testing", secret_key="testing", secure=False)
    store = S3Store(client, bucket, "llamaduo", attempts=3)
    store.ensure_bucket()
    return store


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore | S3Store:
    """Each store backend in turn, so one behaviour suite runs against both."""
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    endpoint = request.getfixturevalue("s3_endpoint")
    return make_s3_store(endpoint, f"bucket-{abs(hash(str(tmp_path))) % 10**8}")
