"""`llamaduo bridge`: bad settings end with exit code 2 and a message naming the variable and the problem."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llamaduo.cli.app import app


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["bridge", "--bus", "sqs"], {}, "LLAMADUO_BRIDGE_BUS: Input should be 'kafka', 'rabbitmq', 'redis' or 'mqtt'"),
        (["bridge"], {}, "LLAMADUO_BRIDGE_BUS: Field required"),
        (
            ["bridge", "--bus", "redis"],
            {"LLAMADUO_BRIDGE_FORWARD": "migration.done"},
            "unknown event(s) ['migration.done']",
        ),
        (["bridge", "--bus", "mqtt"], {"LLAMADUO_BRIDGE_NAME": "a b"}, "LLAMADUO_BRIDGE_NAME: String should match"),
    ],
)
def test_bad_bridge_settings_are_named(
    args: list[str], env: dict[str, str], needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMADUO_BRIDGE_BUS", "placeholder")  # restored after the test (the CLI sets it)
    monkeypatch.delenv("LLAMADUO_BRIDGE_BUS")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert needle in result.output
