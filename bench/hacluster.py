"""Bridge replicas on a PostgreSQL database of their own, behind one balancer (the ha scenario).

Each replica is a ``bridge serve`` process in scaled mode (``BRIDGE_STATE_URL``); a slot keeps
its place when its process is killed and started again, under a new replica id (``r1-2`` is
slot 1's second process), as a Deployment's new pod gets a new name. Notifications reach the
replicas through a :class:`~bench.tcpproxy.Balancer`, as through a Kubernetes Service. A
replica started ``proxied`` reaches PostgreSQL through a :class:`~bench.tcpproxy.TcpProxy` the
scenario can cut. The lease rows are read straight from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from yarl import URL

from bench.procs import Served, bridge_process, free_port
from bench.tcpproxy import Balancer, TcpProxy

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.asynccontextmanager
async def database(label: str) -> AsyncIterator[str]:
    """The URL of a database created for this run, dropped at the end."""
    name = f"bench_{label}_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(
        PG_URL, autocommit=True, connect_timeout=5
    ) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield str(URL(PG_URL).with_path("/" + name))
    finally:
        async with await psycopg.AsyncConnection.connect(
            PG_URL, autocommit=True, connect_timeout=5
        ) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Lease:
    shard: int
    holder: str
    epoch: int
    expires: float  # wall clock (the database's, on this machine the same)


class Cluster:
    def __init__(self, url: str, env: Mapping[str, str], *, shards: int, logs: Path) -> None:
        self.url = url
        self.env = dict(env)
        self.shards = shards
        self.logs = logs  # the directory of the replicas' logs
        self.running: dict[int, Served] = {}  # slot -> its current process
        self.names: dict[int, str] = {}
        self.proxies: dict[str, TcpProxy] = {}  # replica id -> its link to PostgreSQL
        self.balancer = Balancer()
        self._generations: Counter[int] = Counter()
        self._db: psycopg.AsyncConnection[tuple[Any, ...]] | None = None

    async def open(self) -> Cluster:
        await self.balancer.start()
        self._db = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        return self

    @property
    def handler_url(self) -> str:
        return f"http://127.0.0.1:{self.balancer.port}/bitrix24/events"

    async def start(self, slot: int, *, proxied: bool = False) -> str:
        """A new process in ``slot``; its replica id once it is live."""
        self._generations[slot] += 1
        name = f"r{slot + 1}-{self._generations[slot]}"
        url = self.url
        if proxied:
            target = URL(self.url)
            proxy = await TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
            self.proxies[name] = proxy
            url = str(target.with_host("127.0.0.1").with_port(proxy.port))
        env = {**self.env, "BRIDGE_STATE_URL": url, "BRIDGE_REPLICA_ID": name}
        served = bridge_process(env, self.logs / f"ha-{name}.log", port=free_port())
        served.start()
        self.running[slot], self.names[slot] = served, name
        await served.wait_live("/livez")
        self._route()
        return name

    def _route(self) -> None:
        self.balancer.ports = [s.port for s in self.running.values()]

    def slot_of(self, name: str) -> int:
        return next(slot for slot, n in self.names.items() if n == name)

    def signal(self, slot: int, signum: int) -> float:
        """Send ``signum`` to the slot's process; the wall-clock moment it was sent."""
        served = self.running[slot]
        at = time.time()
        os.kill(served.pid, signum)
        return at

    async def wait_exit(self, slot: int, within: float = 60.0) -> int | None:
        served = self.running.pop(slot)
        self._route()
        assert served.proc is not None
        try:
            code = await asyncio.to_thread(served.proc.wait, within)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            code = None
            await asyncio.to_thread(served.proc.wait, 10)
        await served.http.aclose()
        return code

    async def leases(self) -> list[Lease]:
        """The leases held now (unexpired, with a holder)."""
        assert self._db is not None
        cur = await self._db.execute(
            "SELECT shard, holder, epoch, extract(epoch FROM expires_at)::float8 FROM leases "
            "WHERE holder <> '' AND expires_at > now() AND shard < %s",
            (self.shards,),
        )
        return [Lease(int(s), str(h), int(e), float(x)) for s, h, e, x in await cur.fetchall()]

    async def counts(self) -> dict[str, int]:
        """Shards held by each running replica (0 for one that holds none)."""
        held = Counter(lease.holder for lease in await self.leases())
        return {
            name: held.get(name, 0) for slot, name in self.names.items() if slot in self.running
        }

    async def even(self) -> bool:
        """Every shard held, by running replicas only, their counts within 1 of each other."""
        leases = await self.leases()
        counts = Counter(lease.holder for lease in leases)
        live = {self.names[slot] for slot in self.running}
        if len(leases) != self.shards or set(counts) != live:
            return False
        return max(counts.values()) - min(counts.values()) <= 1

    async def wait_even(self, within: float) -> float | None:
        """Seconds until :meth:`even`, or None if it was not within ``within``."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            for served in self.running.values():
                served.check()
            if await self.even():
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        return None

    async def close(self) -> None:
        for slot in list(self.running):
            served = self.running[slot]
            with contextlib.suppress(ProcessLookupError):
                os.kill(served.pid, signal.SIGTERM)
        for slot in list(self.running):
            await self.wait_exit(slot, 30)
        for proxy in self.proxies.values():
            await proxy.close()
        await self.balancer.close()
        if self._db is not None:
            await self._db.close()
