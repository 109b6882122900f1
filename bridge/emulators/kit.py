"""The emulators' shared server kit: an ASGI app under uvicorn on a real loopback socket, in a
background thread with its own event loop (tests and the demo drive it from the outside)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import uvicorn

T = TypeVar("T")


class ThreadedServer:
    """uvicorn in its own thread with its own event loop; the socket is bound before start."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str | None = None,
        log_config: dict[str, Any] | None = None,
        tls: tuple[str, str] | None = None,
        also: Sequence[str] = (),
    ) -> None:
        # Without a log level or config uvicorn leaves the host process's logging alone.
        self.host = host
        self._also = tuple(also)  # more addresses served on the same port (one app, one loop)
        self._tls = tls  # (certificate file, key file): serve HTTPS
        self._requested_port = port
        self._log_level = log_level
        self._log_config = log_config
        self._socket: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> int:
        if self._socket is None:
            # A port picked for the first address may be taken on another: try a few.
            attempts = 5 if self._also and not self._requested_port else 1
            for attempt in range(attempts):
                bound = [_listen(self.host, self._requested_port)]
                try:
                    for host in self._also:
                        bound.append(_listen(host, bound[0].getsockname()[1]))
                except OSError:
                    for sock in bound:
                        sock.close()
                    if attempt == attempts - 1:
                        raise
                    continue
                self._sockets = bound
                break
            self._socket = self._sockets[0]
        port_now: int = self._socket.getsockname()[1]
        return port_now

    @property
    def port(self) -> int:
        return self.bind()

    def serve(self, app: Any, *, timeout: float = 10.0) -> None:
        if self._socket is None:
            raise RuntimeError("bind() first")
        config = uvicorn.Config(
            app,
            log_level=self._log_level,
            log_config=self._log_config,
            access_log=False,
            http="h11",
            ws="none",
            lifespan="on",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=2,
            ssl_certfile=self._tls[0] if self._tls else None,
            ssl_keyfile=self._tls[1] if self._tls else None,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=self._run, args=(server, self._sockets), name=f"uvicorn:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.005)

    def _run(self, server: uvicorn.Server, sockets: list[socket.socket]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=sockets)

        asyncio.run(main())

    def run_in_loop(self, fn: Callable[[], T], *, timeout: float = 10.0) -> T:
        """Call ``fn`` in the server's loop, where the state lives, and wait for its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("server is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self._socket = None
        self._server = None
        self._loop = None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this; without it h11's separate header and body writes
        # meet the client's delayed ACK and every answer takes 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
