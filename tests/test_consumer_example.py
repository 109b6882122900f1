"""examples/consumer.py: each event processed once, through a bridge killed (and its state file
lost) with pages confirmed but not cleared, and a consumer killed holding unacknowledged
messages."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import BridgeProcess, Portal, bridge_env, until
from tests.plugins.broker import AmqpNamespace

EXAMPLE = Path(__file__).parent.parent / "examples" / "consumer.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("consumer_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ConsumerProcess:
    def __init__(self, args: list[str], log_path: Path, amqp_url: str) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "AMQP_URL": amqp_url}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLE), *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_consuming(self) -> None:
        async def consuming() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, self.log()
            return self.log().count("consuming from") == self.starts

        await until(consuming, "the consumer to start", timeout=30)

    def signal_only(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def processed(db: Path) -> list[tuple[str, str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT message_id, type, body FROM events ORDER BY id").fetchall()
        except sqlite3.OperationalError:  # no event yet: the table is created by the first
            return []


async def test_each_event_is_processed_once_across_kills(
    emulated: tuple[EmulatorServer, Portal, int], amqp_ns: AmqpNamespace, tmp_path: Path
) -> None:
    _, portal, port = emulated
    events = ("ONCRMLEADADD", "ONCRMDEALADD")
    db = tmp_path / "consumer.sqlite3"
    consumer = ConsumerProcess(
        ["--queue", f"{amqp_ns.prefix}.crm", "--db", str(db), "--prefetch", "20"]
        + ["--unrouted-exchange", amqp_ns.unrouted_exchange]
        + [arg for e in events for arg in ("--bind", amqp_ns.exchange(e.lower()))],
        tmp_path / "consumer.log",
        amqp_ns.url,
    )
    env = await bridge_env(
        portal,
        amqp_ns,
        tmp_path / "state.sqlite3",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_EVENTS=",".join(events),
        BRIDGE_PAGE_SIZE="20",
        BRIDGE_POLL_INTERVAL="0.5",
    )
    bridge = BridgeProcess(env, tmp_path / "bridge.log")
    per_event = 300
    try:
        consumer.start()
        await consumer.wait_consuming()
        bridge.start()
        await bridge.wait_live()
        # Every clear fails: confirmed pages stay reserved in the portal.
        await portal.faults(fail={"event.offline.clear": 1_000_000})
        for index, event in enumerate(events):
            await portal.generate(event, per_event, start_id=index * per_event + 1)

        async def pages_processed() -> bool:
            return len(processed(db)) >= 40

        await until(pages_processed, "two pages to be processed", timeout=60)
        consumer.signal_only(signal.SIGSTOP)  # frozen: it takes deliveries and acks none
        # Killed mid-drain, and its state file lost with the volume: the restarted bridge finds
        # the reservations again (event.offline.list) and publishes the confirmed pages again,
        # with the same message_ids, as it does after a crash between confirm and clear.
        bridge.kill()
        for path in tmp_path.glob("state.sqlite3*"):
            path.unlink()
        await portal.faults(fail={"event.offline.clear": 0})
        bridge.env["BRIDGE_REFRESH_TOKEN"] = (await portal.app())["refresh_token"]
        bridge.start()
        await bridge.wait_live()
        queue = f"{amqp_ns.prefix}.crm"

        async def prefetch_full() -> bool:
            # Messages wait in the queue only once the frozen consumer holds --prefetch of them.
            return await amqp_ns.message_count(queue) > 0

        await until(prefetch_full, "the frozen consumer to hold unacknowledged messages")
        # Killed holding them: RabbitMQ redelivers them to the next run.
        assert consumer.signal(signal.SIGKILL) == -signal.SIGKILL
        consumer.start()
        await consumer.wait_consuming()
        await portal.wait_empty(timeout=120)

        async def all_processed() -> bool:
            return len(processed(db)) >= len(events) * per_event

        await until(all_processed, "every event to be processed", timeout=60)

        async def drained() -> bool:
            return await amqp_ns.message_count(queue) == 0

        await until(drained, "the consumer's queue to empty", timeout=30)
        assert consumer.signal(signal.SIGTERM) == 0, consumer.log()[-2000:]
    finally:
        bridge.stop()
        consumer.stop()

    rows = processed(db)
    seen = [(kind, json.loads(body)["EVENT_DATA"]["FIELDS"]["ID"]) for _, kind, body in rows]
    expected = [
        (event, str(i))
        for index, event in enumerate(events)
        for i in range(index * per_event + 1, (index + 1) * per_event + 1)
    ]
    assert sorted(seen) == sorted(expected)  # every event, none twice
    assert len({message_id for message_id, _, _ in rows}) == len(rows)
    log = consumer.log()
    assert log.count("duplicate skipped") >= 1  # the bridge's duplicates arrived, were skipped
    redelivered = log.count("redelivered=True") + log.count("redelivery processed")
    assert redelivered >= 1  # RabbitMQ redelivered what the killed consumer held
    assert bridge.starts == 2
    assert consumer.starts == 2


# -- the de-duplication store on its own ----------------------------------------------------


def test_the_store_runs_the_work_once_per_message_id(tmp_path: Path) -> None:
    store = load_example().SeenStore(str(tmp_path / "s.sqlite3"), keep_seconds=60, keep_max=10)
    calls: list[str] = []

    def work(db: sqlite3.Connection, value: str) -> None:
        calls.append(value)

    assert store.process_once("m1", work, "a") is True
    assert store.process_once("m1", work, "again") is False
    assert store.process_once("m2", work, "b") is True
    assert calls == ["a", "b"]


def test_a_failing_work_leaves_no_record(tmp_path: Path) -> None:
    """The record and the work commit together: a redelivery after a failure is processed."""
    store = load_example().SeenStore(str(tmp_path / "s.sqlite3"), keep_seconds=60, keep_max=10)

    def fail(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE effect (x)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.process_once("m1", fail)
    tables = store.db.execute("SELECT name FROM sqlite_master WHERE name = 'effect'").fetchall()
    assert tables == []
    assert store.process_once("m1", lambda db: None) is True


def test_the_store_is_bounded_by_count_and_age(tmp_path: Path) -> None:
    store = load_example().SeenStore(str(tmp_path / "s.sqlite3"), keep_seconds=3600, keep_max=3)
    for index in range(5):
        store.process_once(f"m{index}", lambda db: None)
    assert store.prune() == 2
    kept = {row[0] for row in store.db.execute("SELECT message_id FROM seen")}
    assert kept == {"m2", "m3", "m4"}  # the newest three
    store.db.execute("UPDATE seen SET seen_at = ? WHERE message_id = 'm2'", (time.time() - 7200,))
    assert store.prune() == 1
    assert store.process_once("m2", lambda db: None) is True  # forgotten: past the window


def test_the_window_it_documents_is_the_bridges() -> None:
    """The example promises a retry within a minute: the drain's back-off cap must keep it."""
    from bridge.core.drainer import Drainer

    doc = load_example().__doc__
    defaults = Drainer.__init__.__kwdefaults__
    assert doc is not None
    assert defaults is not None
    assert "back-off of at most a minute" in " ".join(doc.split())
    assert defaults["backoff_cap"] <= 60
