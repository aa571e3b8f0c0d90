"""The deployment files as the tests use them: docker-compose.yml read and interpolated as compose does, and a
real nats-server started from deploy/nats with the per-service users and permissions."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llamaduo.embedded.nats_server import find_nats_server, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
NATS_CONFIG = DEPLOY / "nats" / "nats-server.conf"
NATS_TLS_CONFIG = DEPLOY / "nats" / "nats-server-tls.conf"
SERVICES = ("coordinator", "synthesizer", "trainer", "inferencer", "judge")

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]+)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's own tags (`!reset`, `!override`) understood."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_yaml(path: Path) -> Any:
    """A compose file as plain data (anchors and merge keys resolved, compose tags accepted)."""
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `$VAR`, `$$`."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") or match.group("plain")
        for operator in (":-", "-", ":?", "?"):
            if operator in expression:
                name, default = expression.split(operator, 1)
                present = name in env and (env[name] != "" or ":" not in operator)
                if present:
                    return env[name]
                if "?" in operator:
                    raise KeyError(f"required variable {name} is missing: {default}")
                return interpolate(default, env)
        return env.get(expression, "")

    return _VARIABLE.sub(substitute, value)


def service_environment(compose: Mapping[str, Any], service: str, env: Mapping[str, str]) -> dict[str, str]:
    """The environment compose gives `service`'s container (list or mapping form), interpolated from `env`."""
    raw = compose["services"][service].get("environment") or {}
    if isinstance(raw, list):
        pairs = dict(item.split("=", 1) if "=" in item else (item, env.get(item, "")) for item in raw)
    else:
        pairs = {key: "" if value is None else str(value) for key, value in raw.items()}
    return {key: interpolate(value, env) for key, value in pairs.items()}


def nats_environment(compose: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables compose gives the nats container (the users' passwords, the server name)."""
    return service_environment(compose, "nats", env or {})


class PermissionedNats:
    """nats-server with deploy/nats's configuration: the LLAMADUO account, a user per service, JetStream."""

    def __init__(
        self, store_dir: Path, env: Mapping[str, str], *, config: Path = NATS_CONFIG, log_file: Path | None = None
    ) -> None:
        self.store_dir = store_dir
        self.env = dict(env)
        self.config = config
        self.port = free_port()
        self.monitor_port = free_port()
        self.log_file = log_file or store_dir.parent / f"{store_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, scheme: str = "nats") -> str:
        """The client URL."""
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> PermissionedNats:
        """Start it (the flags only move ports and the store to this test's; everything else is the config)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "-c",
            str(self.config),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-sd",
            str(self.store_dir),
        ]
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(args, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"nats-server did not start: {self.log_file.read_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        """Stop it."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log(self) -> str:
        """What the server wrote (permission violations show up here)."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> PermissionedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
