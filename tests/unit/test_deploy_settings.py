"""How a service reaches a secured NATS from its environment, and the metrics it keeps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from faststream.nats.security import NatsCredentials, NatsUserPassword
from pydantic import ValidationError

from llamaduo.bus.settings import BusSettings
from llamaduo.ops import ServiceMetrics
from tests.support.deployment import DEPLOY


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run([sys.executable, str(DEPLOY / "nats" / "gen-certs.py"), str(folder)], check=True)
    return folder


def test_user_password_and_tls_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, certs: Path) -> None:
    monkeypatch.setenv("LLAMADUO_NATS_URL", "tls://nats-0:4222,tls://nats-1:4222")
    monkeypatch.setenv("LLAMADUO_NATS_USER", "judge")
    monkeypatch.setenv("LLAMADUO_NATS_PASSWORD", "s3cret")
    monkeypatch.setenv("LLAMADUO_NATS_TLS_CA_FILE", str(certs / "ca.pem"))
    monkeypatch.setenv("LLAMADUO_NATS_TLS_CERT_FILE", str(certs / "client-cert.pem"))
    monkeypatch.setenv("LLAMADUO_NATS_TLS_KEY_FILE", str(certs / "client-key.pem"))
    settings = BusSettings()
    options = settings.connect_options()
    assert options["servers"] == ["tls://nats-0:4222", "tls://nats-1:4222"]
    assert options["user"] == "judge" and options["password"] == "s3cret"
    assert options["tls"] is not None
    security = settings.broker_security()
    assert isinstance(security, NatsUserPassword) and security.username == "judge"
    assert security.ssl_context is not None
    assert "s3cret" not in repr(settings), "the password never shows in a repr or a log line"


def test_a_creds_file_is_the_brokers_security(tmp_path: Path) -> None:
    creds = tmp_path / "judge.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    settings = BusSettings(nats_creds_file=creds)
    assert isinstance(settings.broker_security(), NatsCredentials)
    assert settings.connect_options()["user_credentials"] == str(creds)
    assert BusSettings().broker_security() is None and "tls" not in BusSettings().connect_options()


@pytest.mark.parametrize(
    "fields,problem",
    [
        ({"nats_user": "judge", "nats_token": "t"}, "choose one NATS authentication"),
        ({"nats_tls_cert_file": "/etc/hosts"}, "go together"),
        ({"nats_tls_ca_file": "/no/such/ca.pem"}, "LLAMADUO_NATS_TLS_CA_FILE=/no/such/ca.pem: no such file"),
        ({"nats_creds_file": "/no/such.creds"}, "LLAMADUO_NATS_CREDS_FILE=/no/such.creds: no such file"),
    ],
)
def test_bad_security_settings_say_what_is_wrong(fields: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        BusSettings(**fields)  # type: ignore[arg-type]


def test_stage_durations_and_outcomes_are_recorded() -> None:
    metrics = ServiceMetrics("judge", ["judge"])
    with metrics.stage("judging"):
        pass
    with pytest.raises(RuntimeError), metrics.stage("judging"):
        raise RuntimeError("boom")
    text = metrics.render().decode()
    assert 'llamaduo_stage_duration_seconds_count{service="judge",stage="judging"} 2.0' in text
    assert 'llamaduo_tasks_total{outcome="done",service="judge",stage="judging"} 1.0' in text
    assert 'llamaduo_tasks_total{outcome="error",service="judge",stage="judging"} 1.0' in text
