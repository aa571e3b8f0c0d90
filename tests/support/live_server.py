"""An ASGI app served by uvicorn on a loopback port in a background thread: real HTTP for tests and benches."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal, Self


class ThreadedServer:
    """uvicorn serving `app` from a daemon thread; `start()` returns once it accepts connections."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lifespan: Literal["on", "off"] = "off",
        name: str = "uvicorn",
        graceful_timeout_s: int = 1,
    ) -> None:
        """Serve on `host:port` (a free port when 0); `lifespan="on"` runs the app's startup and shutdown too."""
        self.app = app
        self.host = host
        self.port = port
        self.lifespan: Literal["on", "off"] = lifespan
        self.name = name
        self.graceful_timeout_s = graceful_timeout_s
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        """`http://host:port` of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ThreadedServer:
        """Bind the port and serve in the background; raise RuntimeError if it does not come up in time."""
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan=self.lifespan,
            timeout_graceful_shutdown=self.graceful_timeout_s,
            timeout_keep_alive=30,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=self.name)
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.01)
        return self

    def stop(self, join_timeout_s: float = 30.0) -> None:
        """Stop serving and join the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=join_timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None


class ServedInThread:
    """Start/stop/`with` for a scripted server class that has `app`, `host`, `port` and `server_name`."""

    app: Any
    host: str
    port: int
    server_name: str = "scripted server"
    _live: ThreadedServer | None = None

    def start(self) -> Self:
        """Bind a port (a free one when `port` is 0) and serve in a background thread."""
        self._live = ThreadedServer(self.app, host=self.host, port=self.port, name=self.server_name).start()
        self.port = self._live.port
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._live is not None:
            self._live.stop(join_timeout_s=10)
        self._live = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(app: Any, *, lifespan: Literal["on", "off"] = "on", start_timeout_s: float = 10.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 until the block ends; yields its base URL (`http://127.0.0.1:PORT`).

    With `lifespan="on"` the app's startup and shutdown run too (for `llamaduo serve`, shutdown closes the engine).
    """
    server = ThreadedServer(app, lifespan=lifespan, graceful_timeout_s=5).start(start_timeout_s)
    try:
        yield server.base_url
    finally:
        server.stop()
