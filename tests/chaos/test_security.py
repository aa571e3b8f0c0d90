"""Security: artifact URIs and keys that leave the configured bucket, prefix or root directory are refused by both
stores (never read, never written), and secrets never reach a log line."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest

from llamaduo.contract import ArtifactRef
from llamaduo.store import ArtifactOutsideStore, LocalStore
from llamaduo.store.s3 import S3Store
from llamaduo.telemetry import REDACTED, JsonFormatter, Redactor, redactor

pytestmark = [pytest.mark.integration, pytest.mark.scenario("security: escapes and secrets")]
SHA = "0" * 64


def escaping_uris(store: LocalStore | S3Store, tmp_path: Path) -> list[str]:
    """URIs an attacker could put in an event, for this store."""
    inside = store.uri_for("migrations/m-1/iter-0000/responses/responses.jsonl")
    common = ["file:///etc/passwd", "/etc/passwd", "../../etc/passwd", "http://169.254.169.254/latest/meta-data"]
    if isinstance(store, LocalStore):
        outside = tmp_path / "outside.txt"
        outside.write_text("secret")
        link = store.root / "migrations" / "link"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(outside)
        return [
            *common,
            inside.replace("/migrations/", "/migrations/../../../../../../../../etc/passwd#").split("#")[0],
            outside.as_uri(),
            link.as_uri(),  # a symlink inside the root that points out of it
            f"file://{store.root}/../outside.txt",
            f"file://{store.root}%2f..%2f..%2fetc%2fpasswd",
            "s3://bucket/migrations/x",
        ]
    return [
        *common,
        f"s3://another-bucket/{store.prefix}/migrations/m-1/x",
        f"s3://{store.bucket}/not-the-prefix/migrations/m-1/x",
        f"s3://{store.bucket}/{store.prefix}/../other/x",
        f"s3://{store.bucket}/{store.prefix}/migrations/../../x",
        f"s3://{store.bucket}//etc/passwd",
        f"s3://{store.bucket}/{store.prefix}/migrations/m-1/x?versionId=1",
    ]


def test_uris_that_escape_the_store_are_refused(any_store, tmp_path: Path, scenario) -> None:
    uris = escaping_uris(any_store, tmp_path)
    for uri in uris:
        ref = ArtifactRef(uri=uri, sha256=SHA, size=1)
        with pytest.raises(ArtifactOutsideStore) as info:
            any_store.read_bytes(ref)
        assert info.value.reason == "artifact_outside_store", uri
        assert uri in str(info.value)
        with pytest.raises(ArtifactOutsideStore):
            any_store.download(ref, tmp_path / "dest")
        assert not (tmp_path / "dest").exists()
    scenario.fault("escaping URI", len(uris))


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "migrations/../../x", "a//b", "./x", "a/./b", "a\\..\\b"])
def test_keys_that_escape_the_store_are_refused_for_writes_and_reads(any_store, key: str, scenario) -> None:
    with pytest.raises(ArtifactOutsideStore):
        any_store.put_bytes(key, b"x")
    with pytest.raises(ArtifactOutsideStore):
        any_store.head(key)
    scenario.fault("escaping key")


def test_objects_inside_the_store_are_still_read(any_store) -> None:
    ref = any_store.put_bytes("migrations/m-1/iter-0000/responses/ok.jsonl", b"fine")
    assert any_store.read_bytes(ref) == b"fine"


def test_secrets_never_reach_a_log_line(monkeypatch, scenario) -> None:
    api_key = "sk-chaos" + "A1b2C3d4E5f6G7h8"
    s3_secret = "s3-secret-" + os.urandom(6).hex()
    nats_password = "nats-pw-" + os.urandom(6).hex()
    monkeypatch.setenv("LLAMADUO_SERVICE_LLM_API_KEY", api_key)
    monkeypatch.setenv("LLAMADUO_S3_SECRET_KEY", s3_secret)
    monkeypatch.setenv("LLAMADUO_NATS_PASSWORD", nats_password)
    redactor.register_environment()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("chaos"))
    logger = logging.getLogger("chaos.secrets")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("connecting to nats://chaos:%s@127.0.0.1:4222", nats_password)
        logger.warning("request failed", extra={"headers": {"Authorization": f"Bearer {api_key}"}, "key": s3_secret})
        logger.info("settings", extra={"api_key": "another-one-123", "config": {"s3_secret_key": "zzz-secret-zz"}})
        try:
            raise RuntimeError(f"S3 said no to secret_key={s3_secret}")
        except RuntimeError:
            logger.exception("store failed")
        logger.info("a key shaped like OpenAI's: sk-proj-abcdefghijklmnopqrstuvwx, and prompt_tokens stays")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 5
    for secret in (api_key, s3_secret, nats_password, "another-one-123", "zzz-secret-zz", "sk-proj-abcdefghijkl"):
        assert secret not in text, secret
    assert REDACTED in lines[0]["msg"] and "nats://chaos:***@127.0.0.1:4222" in lines[0]["msg"]
    assert lines[2]["api_key"] == REDACTED and lines[2]["config"]["s3_secret_key"] == REDACTED
    assert "prompt_tokens stays" in lines[4]["msg"]
    scenario.fault("secret in a log record", 6)


def test_the_redactor_ignores_short_values_and_keeps_ordinary_text() -> None:
    local = Redactor()
    local.register("1", "true", "")
    local.register_environment({"LLAMADUO_NATS_TOKEN": "tok-123456", "PATH": "/usr/bin"})
    assert local("true 1 /usr/bin tok-123456") == f"true 1 /usr/bin {REDACTED}"
