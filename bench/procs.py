"""The processes a scenario runs: the emulator, the bridge, a bare app; and watching them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from bench.broker import Namespace

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Emulator:
    """``bench.emulator_server`` in a child process, with the control API as methods."""

    def __init__(self, log_path: Path, **config: Any) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.http = httpx.AsyncClient(timeout=120)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "bench.emulator_server", json.dumps(self.config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_child_env({}),
            )

    async def start(self) -> Emulator:
        self.proc = self._spawn()
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), START_TIMEOUT)
        if not line:
            raise RuntimeError(f"the emulator did not start: {tail(self.log_path)}")
        self.base_url = json.loads(line)["base_url"]
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=120)
        return self

    async def stop(self) -> None:
        await self.http.aclose()
        if self.proc is None:
            return
        stdin: IO[bytes] | None = self.proc.stdin
        with contextlib.suppress(OSError):
            if stdin is not None:
                stdin.close()
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    async def _json(self, method: str, path: str, body: object | None = None) -> Any:
        response = await self.http.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    async def app(self) -> dict[str, str]:
        answer: dict[str, str] = await self._json("GET", "/_emulator/app")
        return answer

    async def generate(self, event: str, count: int, start_id: int = 1) -> dict[str, int]:
        body = {"generate": {"event": event, "count": count, "start_id": start_id}}
        answer: dict[str, int] = await self._json("POST", "/_emulator/events", body)
        return answer

    async def add(self, events: list[dict[str, Any]]) -> dict[str, int]:
        answer: dict[str, int] = await self._json("POST", "/_emulator/events", {"events": events})
        return answer

    async def queue(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self._json("GET", "/_emulator/queue")
        return answer

    async def is_empty(self) -> bool:
        queue = await self.queue()
        return bool(queue["free"] == 0 and not queue["reserved"])

    async def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self._json("GET", "/_emulator/stats")
        return answer

    async def requests(self) -> int:
        """HTTP requests under ``/rest/`` so far; a ``batch`` counts once."""
        answer = await self._json("GET", "/_bench/requests")
        return int(answer["rest"])


async def bridge_env(
    emulator: Emulator, ns: Namespace, state_path: Path, **extra: str
) -> dict[str, str]:
    """A bridge bootstrapped against the emulated portal (like ``tests.harness.bridge_env``)."""
    app = await emulator.app()
    env = {
        "BRIDGE_AMQP_URL": ns.url,
        "BRIDGE_EXCHANGE_TEMPLATE": ns.exchange_template,
        "BRIDGE_UNROUTED_EXCHANGE": ns.unrouted_exchange,
        "BRIDGE_CLIENT_ID": app["client_id"],
        "BRIDGE_CLIENT_SECRET": app["client_secret"],
        "BRIDGE_OAUTH_URL": app["oauth_url"],
        "BRIDGE_PORTAL_URL": emulator.base_url,
        "BRIDGE_REFRESH_TOKEN": app["refresh_token"],
        "BRIDGE_APPLICATION_TOKEN": app["application_token"],
        "BRIDGE_STATE_PATH": str(state_path),
        "BRIDGE_POLL_INTERVAL": "0",
        "BRIDGE_LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


@dataclass
class Rss:
    """Peak resident memory of one process, sampled from ``/proc/<pid>/status``."""

    pid: int
    max_rss_kb: int = 0
    hwm_kb: int = 0
    samples: int = 0

    def sample(self) -> None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        for name, value in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE):
            if name == "VmRSS":
                self.max_rss_kb = max(self.max_rss_kb, int(value))
            else:
                self.hwm_kb = max(self.hwm_kb, int(value))
        self.samples += 1

    @property
    def peak_mb(self) -> float:
        return max(self.max_rss_kb, self.hwm_kb) / 1024


@contextlib.asynccontextmanager
async def sampling(pid: int, interval: float = 0.05) -> AsyncIterator[Rss]:
    rss = Rss(pid)

    async def loop() -> None:
        while True:
            rss.sample()
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop())
    try:
        yield rss
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        rss.sample()


@dataclass
class Served:
    """A child process serving HTTP on a loopback port: the bridge or the bare app."""

    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    wrapped: bool = False  # argv starts with a profiler that runs the server as its child
    proc: subprocess.Popen[bytes] | None = None
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=10))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id (the profiler's child when wrapped)."""
        assert self.proc is not None
        if self.wrapped:
            children = _children(self.proc.pid)
            if children:
                return children[0]
        return self.proc.pid

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=_child_env(self.env), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def pin(self, cpus: set[int]) -> None:
        """Run every thread of the server on ``cpus`` (threads started later inherit it)."""
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), cpus)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"exited with {self.proc.returncode}: {tail(self.log_path)}")

    async def wait_live(self, path: str, within: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get(self.url + path, timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.argv[-1]} not live after {within}s: {tail(self.log_path)}")

    async def stop(self, grace: float = 25.0) -> None:
        await self.http.aclose()
        if self.proc is None or self.proc.poll() is not None:
            return
        # A profiler writes its output once the server it runs has exited.
        os.kill(self.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def bridge_process(
    env: Mapping[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    wrap: Sequence[str] = (),
) -> Served:
    """``python -m bridge serve``, optionally under ``wrap`` (a profiler's command line)."""
    port = port or free_port()
    full = {**env, "BRIDGE_HTTP_HOST": "127.0.0.1", "BRIDGE_HTTP_PORT": str(port)}
    argv = [*wrap, sys.executable, "-m", "bridge", "serve"]
    return Served(argv, full, port, log_path, wrapped=bool(wrap))


def bare_process(log_path: Path) -> Served:
    port = free_port()
    return Served([sys.executable, "-m", "bench.bare_app", str(port)], {}, port, log_path)


_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN|[+-]Inf)$", re.MULTILINE)


def metric_total(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus exposition."""
    return sum(float(value) for found, _, value in _SAMPLE.findall(text) if found == name)


async def bridge_metric(bridge: Served, name: str) -> float:
    response = await bridge.http.get(bridge.url + "/metrics")
    response.raise_for_status()
    return metric_total(response.text, name)


async def wait_first_pass(bridge: Served, within: float = START_TIMEOUT) -> float:
    """Wait until the startup drain pass has finished; the count of passes so far."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        bridge.check()
        with contextlib.suppress(httpx.HTTPError):
            passes = await bridge_metric(bridge, "bitrix24_bridge_drain_passes_total")
            if passes >= 1:
                return passes
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no drain pass finished within {within}s: {tail(bridge.log_path)}")


async def settle_metric(
    bridge: Served, name: str, *, quiet: float = 1.5, within: float = 20.0
) -> float:
    """The metric's value once it stopped changing for ``quiet`` seconds (bounded)."""
    deadline = time.monotonic() + within
    value = await bridge_metric(bridge, name)
    changed = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - changed < quiet:
        await asyncio.sleep(0.1)
        now = await bridge_metric(bridge, name)
        if now != value:
            value, changed = now, time.monotonic()
    return value
