"""A minimal HTTP/1.1 load client: keep-alive connections on asyncio streams.

``httpx`` costs about 3 ms of CPU per request on the 2-core benchmark machine, so 20 httpx
clients top out near 250 requests/s and their own queueing, not the server, sets the latency
they measure. This client sends each request in one write and reads the answer by its
``Content-Length``: a few tens of microseconds per request, leaving the server as the bottleneck.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.report import percentile


@dataclass
class Load:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def ms(self, q: float) -> float | None:
        value = percentile(self.latencies, q)
        return None if value is None else value * 1000


def _request(host: str, path: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def post_many(
    port: int,
    path: str,
    body: Callable[[], bytes],
    *,
    total: int,
    clients: int,
    content_type: str = "application/x-www-form-urlencoded",
) -> Load:
    """``total`` POSTs from ``clients`` connections at once, each as fast as answers come."""
    load = Load()
    left = iter(range(total))
    host = f"127.0.0.1:{port}"

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for _ in left:
                request = _request(host, path, content_type, body())
                began = time.perf_counter()
                try:
                    status = await _exchange(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    load.statuses[0] += 1
                    return
                load.latencies.append(time.perf_counter() - began)
                load.statuses[status] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    load.seconds = time.perf_counter() - started
    return load
