"""A loopback TCP proxy to cut or freeze, to break a connection the way networks do.

``cut()`` aborts every current connection (both sides see a reset); ``pause()`` stops moving
bytes and serving new connections (the client sees a silent peer, as with a partition);
``resume()`` lets everything flow again, including connections that arrived while paused.
:class:`Balancer` spreads connections over several ports, as a Kubernetes Service does.
The tests use it too (``tests/plugins/tcpproxy.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from yarl import URL

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str = BROKER_HOST, target_port: int = BROKER_PORT) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.accepted = 0  # connections served so far, cut or not
        self.bytes_up = 0  # client -> target, all links
        self._cut_at: int | None = None
        self._pause_at_cut = False
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.StreamWriter] = set()  # accepted while paused

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url(self, url: str) -> str:
        """The same AMQP URL, pointed at this proxy."""
        return str(URL(url).with_host("127.0.0.1").with_port(self.port))

    @property
    def connections(self) -> int:
        return len(self._links)

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        self._flowing.set()
        # Aborted transports end every pipe by themselves; cancelling a connection handler
        # would make asyncio log an error from its done-callback.
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=5)
            for task in stuck:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def cut(self) -> int:
        """Abort every current connection (and those waiting while paused); returns how many
        established links were cut."""
        links = list(self._links)
        self._links.clear()
        waiting = list(self._waiting)
        self._waiting.clear()
        for client in waiting:
            client.transport.abort()
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        return len(links)

    def cut_after(self, nbytes: int, *, then_pause: bool = False) -> None:
        """Cut every link once ``nbytes`` more bytes went upstream (mid-frame, deterministic);
        ``then_pause``: and hold every new connection from that moment (a cut, then an outage)."""
        self._cut_at = self.bytes_up + nbytes
        self._pause_at_cut = then_pause

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            self._waiting.add(client_w)
            try:
                await self._flowing.wait()
            finally:
                self._waiting.discard(client_w)
            if client_w.transport.is_closing():
                return  # cut while waiting
            try:
                up_r, up_w = await self._connect()
            except OSError:
                client_w.transport.abort()
                return
            self.accepted += 1
            link = (client_w, up_w)
            self._links.add(link)
            try:
                await asyncio.gather(
                    self._pipe(client_r, up_w, upstream=True), self._pipe(up_r, client_w)
                )
            finally:
                self._links.discard(link)
                client_w.transport.abort()
                up_w.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.target_host, self.target_port)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool = False
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(CHUNK):
                # Bytes read while paused are held back here; the kernel buffers fill up and the
                # sender stalls, as behind a dead link.
                await self._flowing.wait()
                if writer.transport.is_closing():
                    return
                cut = False
                if upstream:
                    if self._cut_at is not None and self.bytes_up + len(data) >= self._cut_at:
                        data = data[: self._cut_at - self.bytes_up]
                        self._cut_at, cut = None, True
                    self.bytes_up += len(data)
                writer.write(data)
                if cut:
                    if self._pause_at_cut:
                        self.pause()
                    self.cut()
                    return
                await writer.drain()
        # EOF or error on one side: end the whole link, as a reset would.
        writer.transport.abort()


class Balancer(TcpProxy):
    """Each new connection goes to the next of ``ports`` (on ``host``) that accepts it."""

    def __init__(self, ports: Sequence[int] = (), host: str = "127.0.0.1") -> None:
        super().__init__(host, 0)
        self.ports = list(ports)
        self._turn = 0

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ports = list(self.ports)
        for n in range(len(ports)):
            port = ports[(self._turn + n) % len(ports)]
            try:
                opened = await asyncio.open_connection(self.target_host, port)
            except OSError:
                continue
            self._turn += n + 1
            return opened
        raise ConnectionRefusedError(f"no port of {ports} accepts connections")
