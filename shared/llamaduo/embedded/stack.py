"""The embedded stack: nats-server, a local service LLM and the five services as supervised processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamaduo.embedded.nats_server import NatsServer, free_port, wait_for_port

log = logging.getLogger(__name__)

SERVICES = ("coordinator", "synthesizer", "trainer", "inferencer", "judge")
STACK_FILE = "stack.json"
DEFAULT_SERVED_MODEL = "bundled:smollm2-135m-instruct"


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the supervisor dies, even by SIGKILL.

    Linux ties this to the thread that started the child: a child restarted by `supervise`'s thread is stopped
    when supervision ends, which is when the stack stops anyway.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    """One supervised process."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        """Start (or restart) the process, appending to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class StackConfig:
    """What to start; anything given as a URL is used as is instead of being started."""

    state_dir: Path
    nats_url: str | None = None
    store_url: str | None = None
    service_llm_base_url: str | None = None
    service_llm_model: str | None = None
    serve_model: str = DEFAULT_SERVED_MODEL
    serve_port: int | None = None
    services: tuple[str, ...] = SERVICES
    replicas: dict[str, int] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 3


class Stack:
    """Starts what the config does not point at, supervises the children and stops everything it started."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir.expanduser().resolve()
        self.nats: NatsServer | None = None
        self.children: list[Child] = []
        self.nats_url = config.nats_url or ""
        self.store_url = config.store_url or (self.state_dir / "artifacts").as_uri()
        self.service_llm_base_url = config.service_llm_base_url or ""
        self.service_llm_model = config.service_llm_model or config.serve_model

    @property
    def logs_dir(self) -> Path:
        """Where each child's log goes."""
        return self.state_dir / "logs"

    def env(self) -> dict[str, str]:
        """The environment every service gets: configuration only, as in production."""
        env = dict(os.environ)
        env.update(
            {
                "LLAMADUO_NATS_URL": self.nats_url,
                "LLAMADUO_STORE_URL": self.store_url,
                "LLAMADUO_SERVICE_LLM_BASE_URL": self.service_llm_base_url,
                "LLAMADUO_SERVICE_LLM_MODEL": self.service_llm_model,
                "LLAMADUO_WORK_DIR": str(self.state_dir / "work"),
                "HF_HUB_OFFLINE": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.setdefault("LLAMADUO_SERVICE_LLM_API_KEY", "local-no-key")
        # Trainer, inferencer and the local LLM share one machine's cores: idle OpenMP threads must sleep, not
        # spin, or two torch processes slow each other down many times over.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.update(self.config.extra_env)
        return env

    def start(self) -> Stack:
        """Start nats-server (unless given), the local service LLM (unless given) and the services."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.nats_url:
                self.nats = NatsServer(
                    self.state_dir / "nats", log_file=self.logs_dir / "nats-server.log", preexec=die_with_parent
                )
                self.logs_dir.mkdir(parents=True, exist_ok=True)
                self.nats.start()
                self.nats_url = self.nats.url
            env = self.env()
            if not self.service_llm_base_url:
                port = self.config.serve_port or free_port()
                self.service_llm_base_url = f"http://127.0.0.1:{port}/v1"
                env = self.env()
                serve = Child(
                    "serve",
                    [
                        sys.executable,
                        "-m",
                        "llamaduo",
                        "serve",
                        "--model",
                        self.config.serve_model,
                        "--port",
                        str(port),
                    ],
                    env,
                    self.logs_dir / "serve.log",
                )
                serve.start()
                self.children.append(serve)
            for service in self.config.services:
                for replica in range(self.config.replicas.get(service, 1)):
                    name = service if replica == 0 else f"{service}-{replica + 1}"
                    child = Child(
                        name, [sys.executable, "-m", f"llamaduo_{service}"], env, self.logs_dir / f"{name}.log"
                    )
                    child.start()
                    self.children.append(child)
            self._write_stack_file()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the local service LLM (if started) answers; raise if a child died meanwhile."""
        if any(child.name == "serve" for child in self.children):
            port = int(self.service_llm_base_url.rsplit(":", 1)[1].split("/")[0])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.check()
                try:
                    wait_for_port(port, timeout=1.0)
                    return
                except TimeoutError:
                    continue
            raise TimeoutError(f"the local service LLM did not start within {timeout:.0f}s (see {self.logs_dir})")

    def mark_ready(self) -> None:
        """Record in the stack file that every part answers (what `llamaduo up --detach` waits for)."""
        self._write_stack_file(ready=True)

    def check(self) -> None:
        """Restart children that died (up to `max_restarts` each); raise when one keeps dying."""
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                code = child.process.returncode
                if child.restarts >= self.config.max_restarts:
                    raise RuntimeError(f"{child.name} keeps exiting (code {code}); see {child.log_path}")
                child.restarts += 1
                log.warning("restarting %s (exit code %s)", child.name, code)
                child.start()

    def supervise(self, on_failure: Callable[[Exception], None], interval: float = 1.0) -> threading.Event:
        """Run `check` in a background thread until the returned event is set; report a child that keeps dying."""
        stopped = threading.Event()

        def loop() -> None:
            while not stopped.wait(interval):
                try:
                    self.check()
                except Exception as exc:
                    on_failure(exc)
                    return

        threading.Thread(target=loop, name="stack-supervisor", daemon=True).start()
        return stopped

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every child (services first, then the service LLM, then nats-server)."""
        for child in reversed(self.children):
            child.stop(timeout)
        self.children.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        (self.state_dir / STACK_FILE).unlink(missing_ok=True)

    def _write_stack_file(self, ready: bool = False) -> None:
        info = {
            "ready": ready,
            "pid": os.getpid(),
            "nats_url": self.nats_url,
            "store_url": self.store_url,
            "service_llm_base_url": self.service_llm_base_url,
            "service_llm_model": self.service_llm_model,
            "logs": str(self.logs_dir),
            "children": {child.name: child.process.pid for child in self.children if child.process},
        }
        (self.state_dir / STACK_FILE).write_text(json.dumps(info, indent=2))

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_stack_file(state_dir: Path) -> dict[str, object] | None:
    """What a running `llamaduo up` wrote about itself, or None."""
    path = state_dir.expanduser() / STACK_FILE
    if not path.is_file():
        return None
    info: dict[str, object] = json.loads(path.read_text())
    return info
