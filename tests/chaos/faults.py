"""Fault injectors: a TCP proxy that can cut a server off, a disk that fills up, SIGKILL, a restartable nats-server."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamaduo.embedded.nats_server import NatsServer, find_nats_server, free_port, wait_for_port


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`; `cut()` closes every connection and refuses new ones until `restore()`.

    Run in threads, so synchronous clients (minio, urllib3) in any thread see a real outage: refused connections
    and reset sockets, exactly what an unreachable S3 endpoint looks like.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopped = threading.Event()
        self.cuts = 0
        self.refused = 0

    @property
    def address(self) -> str:
        """host:port clients should use."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        """Start listening (again)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._stopped.clear()
        threading.Thread(target=self._accept, args=(listener,), name="chaos-proxy", daemon=True).start()
        return self

    def cut(self) -> None:
        """The endpoint goes away: open connections are reset and new ones refused."""
        with self._lock:
            self.cuts += 1
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave the port listening.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()

    def restore(self) -> None:
        """The endpoint is back."""
        self.start()

    def stop(self) -> None:
        """Stop for good."""
        self._stopped.set()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._listener is not listener:  # cut while this connection was arriving
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        pair = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def small_disk(path: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` KiB mounted at `path` (needs root / CAP_SYS_ADMIN); raises PermissionError otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        raise PermissionError(f"cannot mount a small tmpfs for the disk-full fault: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


class AuthNatsServer(NatsServer):
    """nats-server with JetStream, file storage and a user/password: restartable on the same port and store."""

    def __init__(self, store_dir: Path, log_file: Path, user: str = "chaos", password: str | None = None) -> None:
        super().__init__(store_dir, log_file=log_file)
        self.user = user
        self.password = password or f"nats-pw-{uuid.uuid4().hex}"
        self.restarts = 0

    def start(self) -> AuthNatsServer:
        """Start and wait until it accepts connections (JetStream recovers its file store on a restart)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--user",
            self.user,
            "--pass",
            self.password,
        ]
        assert self.log_file is not None
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        return self

    def restart(self, kill: bool = True) -> None:
        """SIGKILL (or SIGTERM) the server and start it again on the same port and store directory."""
        self.stop(kill=kill)
        self.restarts += 1
        self.start()

    def __enter__(self) -> AuthNatsServer:
        return self.start()


def kill9(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and reap it."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def log_records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON records of a service log (lines that are not JSON are skipped)."""
    if not path.is_file():
        return
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)
