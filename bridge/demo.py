"""``bitrix24-bridge demo``: the emulator, the bridge and a RabbitMQ subscriber in one process.

Start order: broker check and subscriber, emulator, bridge, install, generator. Everything
stops in reverse order, after the bridge has drained what was generated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import httpx
import uvicorn
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from prometheus_client import CollectorRegistry

from bridge import logs
from bridge.amqp.publisher import redact_url
from bridge.app import create_app
from bridge.core.errors import BridgeError
from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from bridge.metrics import PREFIX
from bridge.server import Server
from bridge.service import Service
from bridge.settings import load_settings

DEFAULT_EVENTS = "ONCRMLEADADD,ONCRMLEADUPDATE,ONCRMDEALADD,ONCRMDEALUPDATE,ONCRMCONTACTADD"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# A prefix of its own, so the demo never publishes into a real installation's exchanges.
EXCHANGE_TEMPLATE = "demo.bitrix24.{event}"
UNROUTED_EXCHANGE = "demo.bitrix24.unrouted"
HOW_TO_START = "start it with 'sudo rabbitmq-server -detached' or run ./scripts/setup.sh"
STARTUP_TIMEOUT = 15.0
DRAIN_TIMEOUT = 30.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitrix24-bridge demo",
        description="Run the Bitrix24 emulator, the bridge and a RabbitMQ subscriber together, "
        "generate CRM events and show them arrive. Ctrl-C stops it.",
        epilog=(
            "examples:\n"
            "  bitrix24-bridge demo\n"
            "  bitrix24-bridge demo --rate 20 --duration 60 --quiet"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=5.0, help="events per second (default 5)")
    parser.add_argument("--events", default=DEFAULT_EVENTS, help="comma list of event names")
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("BRIDGE_AMQP_URL") or DEFAULT_AMQP_URL,
        help="RabbitMQ (default: BRIDGE_AMQP_URL or the local guest account)",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="stop after SECONDS (default: on Ctrl-C)"
    )
    parser.add_argument("--port", type=int, default=0, help="the bridge's port (default: free)")
    parser.add_argument(
        "--quiet", action="store_true", help="no line per message, only the live count"
    )
    return parser


@dataclass
class Counts:
    generated: int = 0
    coalesced: int = 0
    ignored: int = 0
    consumed: int = 0
    published: int = 0
    cleared: int = 0
    waiting: int = 0  # free + reserved in the portal's queue

    @property
    def expected(self) -> int:
        """Events the bridge must publish: a coalesced one merged into a row already queued."""
        return self.generated - self.coalesced - self.ignored

    def line(self) -> str:
        extra = f"  ignored {self.ignored}" if self.ignored else ""
        return (
            f"generated {self.generated}  coalesced {self.coalesced}{extra}  "
            f"published {self.published}  cleared {self.cleared}  "
            f"consumed {self.consumed}  in portal queue {self.waiting}"
        )


class Screen:
    """Message lines scroll; on a terminal the status line stays redrawn beneath them."""

    def __init__(self, quiet: bool, status: Callable[[], str]) -> None:
        self.quiet = quiet
        self.tty = sys.stdout.isatty()
        self._status = status
        self._shown = False

    def _draw(self) -> None:
        # A line wider than the terminal wraps, and "\r" would then redraw only its tail.
        width = shutil.get_terminal_size().columns - 1
        sys.stdout.write("\r\033[K" + self._status()[:width])
        sys.stdout.flush()
        self._shown = True

    def say(self, line: str) -> None:
        if self.tty and self._shown:
            sys.stdout.write("\r\033[K")
        print(line, flush=not self.tty)
        if self.tty and self._shown:
            self._draw()

    def message(self, line: str) -> None:
        if not self.quiet:
            self.say(line)

    def status(self) -> None:
        if self.tty:
            self._draw()
        else:
            print(self._status(), flush=True)

    def end_status(self) -> None:
        if self.tty and self._shown:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self._shown = False


class Subscriber:
    """What a consumer team would run: a queue bound to every demo exchange."""

    def __init__(self, url: str, events: Sequence[str], counts: Counts, screen: Screen) -> None:
        self.url = url
        self.events = events
        self.counts = counts
        self.screen = screen
        self.connection: AbstractConnection | None = None

    async def connect(self) -> None:
        self.connection = await aio_pika.connect(
            self.url, timeout=5, client_properties={"connection_name": "bitrix24-bridge demo"}
        )

    async def start(self) -> None:
        assert self.connection is not None
        channel = await self.connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for event in self.events:
            # Declared exactly as the publisher declares it, or the broker refuses one of us.
            exchange = await channel.declare_exchange(
                EXCHANGE_TEMPLATE.format(event=event.lower()),
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                arguments={"alternate-exchange": UNROUTED_EXCHANGE},
            )
            await queue.bind(exchange, routing_key="#")
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.counts.consumed += 1
        try:
            body: Any = json.loads(message.body)
            fields = (body.get("EVENT_DATA") or {}).get("FIELDS") or {}
            event_id, entity = body.get("ID"), fields.get("ID")
        except (ValueError, AttributeError):
            event_id = entity = "?"
        self.screen.message(
            f"  {message.type or '?':<16} ID={event_id!s:<6} entity={entity!s:<4} "
            f"message_id={message.message_id}  routing_key={message.routing_key}"
        )

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


def _sample(registry: CollectorRegistry, name: str, events: Sequence[str]) -> int:
    total = 0.0
    for event in events:
        value = registry.get_sample_value(PREFIX + name, {"event": event})
        total += value or 0.0
    return int(total)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The emulator does the same: without it h11's split writes meet delayed ACKs (40 ms each).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise BridgeError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    return sock


class _QuietServer(Server):
    """The demo owns SIGINT/SIGTERM: it drains before it stops the bridge."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.events = [e.strip().upper() for e in args.events.split(",") if e.strip()]
        self.counts = Counts()
        self.screen = Screen(args.quiet, self._status_line)
        self.stop = asyncio.Event()
        self.abort = asyncio.Event()  # a second Ctrl-C: do not wait for the drain
        self.rng = random.Random()
        self.started = time.monotonic()
        self.service: Service | None = None

    def _status_line(self) -> str:
        if self.service is not None:
            # In-process counters are cheap to read: fresh on every redraw, unlike the queue.
            self._read_metrics(self.service)
        return f"[{time.monotonic() - self.started:4.0f}s] {self.counts.line()}"

    def _signal(self) -> None:
        if self.stop.is_set():
            self.abort.set()
        self.stop.set()

    async def run(self) -> int:
        safe_url = redact_url(self.args.amqp_url)
        subscriber = Subscriber(self.args.amqp_url, self.events, self.counts, self.screen)
        # aiormq logs a failed connect at ERROR; here the one line below says it better.
        aiormq_log = logging.getLogger("aiormq.connection")
        level = aiormq_log.level
        aiormq_log.setLevel(logging.CRITICAL)
        try:
            await subscriber.connect()
        except aiormq.exceptions.ProbableAuthenticationError:
            print(f"RabbitMQ at {safe_url} refused the login: check the user and password")
            return 1
        except (OSError, TimeoutError):
            print(f"RabbitMQ is not reachable at {safe_url}: {HOW_TO_START}")
            return 1
        except Exception as exc:
            # It answered but would not let us in: most often a virtual host that does not exist.
            print(
                f"RabbitMQ at {safe_url} refused the connection ({type(exc).__name__}): "
                "check the virtual host and the user's permissions"
            )
            return 1
        finally:
            aiormq_log.setLevel(level)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signal)
        state_dir = tempfile.mkdtemp(prefix="bitrix24-bridge-demo-")
        try:
            await subscriber.start()
            return await self._with_emulator(state_dir)
        except (BridgeError, httpx.HTTPError, aiormq.exceptions.AMQPError) as exc:
            # Anything the demo cannot go on without; one line, as every command reports it.
            self.screen.end_status()
            kind = "" if isinstance(exc, BridgeError) else f"{type(exc).__name__}: "
            print(f"bitrix24-bridge demo: {kind}{exc}")
            return 1
        finally:
            with contextlib.suppress(Exception):
                await subscriber.close()
            shutil.rmtree(state_dir, ignore_errors=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _with_emulator(self, state_dir: str) -> int:
        # The portal's default rate limit: the demo shows the bridge living within it.
        emulator = EmulatorServer(EmulatorConfig(min_timeout=1))
        await asyncio.to_thread(emulator.start)
        try:
            async with httpx.AsyncClient(base_url=emulator.base_url, timeout=10) as http:
                return await self._with_bridge(emulator, http, state_dir)
        finally:
            await asyncio.to_thread(emulator.stop)

    async def _with_bridge(
        self, emulator: EmulatorServer, http: httpx.AsyncClient, state_dir: str
    ) -> int:
        app_info = (await http.get("/_emulator/app")).raise_for_status().json()
        sock = _listen(self.args.port)
        port = sock.getsockname()[1]
        bridge_url = f"http://127.0.0.1:{port}"
        settings = load_settings(
            {
                "BRIDGE_AMQP_URL": self.args.amqp_url,
                "BRIDGE_HTTP_HOST": "127.0.0.1",
                "BRIDGE_HTTP_PORT": str(port),
                "BRIDGE_STATE_PATH": os.path.join(state_dir, "state.sqlite3"),
                "BRIDGE_CLIENT_ID": app_info["client_id"],
                "BRIDGE_CLIENT_SECRET": app_info["client_secret"],
                "BRIDGE_OAUTH_URL": app_info["oauth_url"],
                "BRIDGE_PUBLIC_URL": bridge_url,
                "BRIDGE_EVENTS": ",".join(self.events),
                "BRIDGE_EXCHANGE_TEMPLATE": EXCHANGE_TEMPLATE,
                "BRIDGE_UNROUTED_EXCHANGE": UNROUTED_EXCHANGE,
                "BRIDGE_MIN_TIMEOUT": "1",
                # Safety drains pick up events that arrived while minTimeout muted the portal.
                "BRIDGE_POLL_INTERVAL": "2",
                "BRIDGE_LOG_LEVEL": "WARNING",
                "BRIDGE_LOG_FORMAT": "text",
            }
        )
        service = Service(settings)
        try:
            await service.open()
        except BaseException:
            sock.close()
            await service.close(grace=1)
            raise
        config = uvicorn.Config(
            create_app(settings, service=service),
            log_config=None,
            lifespan="on",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        server = _QuietServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        self.service = service
        try:
            await self._wait_started(server, task)
            print(f"bitrix24 portal emulator at {emulator.base_url}; bridge at {bridge_url}")
            await self._install(emulator, http, bridge_url)
            return await self._flow(service, http)
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            sock.close()

    async def _wait_started(self, server: Server, task: asyncio.Task[None]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if task.done():
                task.result()
                raise BridgeError("the bridge's HTTP server did not start")
            if time.monotonic() > deadline:
                raise BridgeError("the bridge's HTTP server did not start in time")
            await asyncio.sleep(0.02)

    async def _install(self, emulator: EmulatorServer, http: httpx.AsyncClient, url: str) -> None:
        """The portal sends ONAPPINSTALL; the bridge verifies it and binds the events."""
        answer = (
            (await http.post("/_emulator/install", json={"url": f"{url}/bitrix24/events"}))
            .raise_for_status()
            .json()
        )
        if answer.get("status") != 200:
            raise BridgeError(f"the bridge answered the install with {answer.get('status')}")
        portal = emulator.portal
        assert portal is not None

        def bound() -> bool:
            return portal.handler_for("ONOFFLINEEVENT") is not None and all(
                portal.is_bound(event, "") for event in self.events
            )

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not await asyncio.to_thread(emulator.run_in_loop, bound):
            if time.monotonic() > deadline:
                raise BridgeError("the bridge did not bind the events in time (see its log)")
            await asyncio.sleep(0.05)
        print(
            f"installed: member_id={portal.config.member_id}, bound {', '.join(self.events)} "
            f"as offline events; subscribed to {EXCHANGE_TEMPLATE.format(event='*')}"
        )

    async def _flow(self, service: Service, http: httpx.AsyncClient) -> int:
        duration = self.args.duration
        print(
            f"generating {self.args.rate:g} events/s"
            + (f" for {duration:g} s" if duration is not None else "; Ctrl-C stops")
        )
        generator = asyncio.create_task(self._generate(http))
        status = asyncio.create_task(self._status_loop(service, http))
        try:
            if duration is None:
                await self.stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), duration)
            self.stop.set()
            await generator
            drained = await self._drain(service, http)
        finally:
            generator.cancel()
            status.cancel()
            await asyncio.gather(generator, status, return_exceptions=True)
        await self._refresh(service, http)
        self.screen.end_status()
        c = self.counts
        print(
            f"summary: generated={c.generated} coalesced={c.coalesced} ignored={c.ignored} "
            f"published={c.published} cleared={c.cleared} consumed={c.consumed} "
            f"waiting={c.waiting}"
        )
        if not drained:
            print("the bridge did not drain everything before the demo stopped")
            return 1
        return 0

    async def _generate(self, http: httpx.AsyncClient) -> None:
        rate = max(self.args.rate, 0.001)
        # Few enough entity ids that the same object changes again while its event still waits
        # in the portal queue: Bitrix24 keeps only the latest state, so some events coalesce.
        entities = max(10, int(rate * 2))
        loop = asyncio.get_running_loop()
        begun = loop.time()
        tick = min(1.0 / rate, 0.1)
        while not self.stop.is_set():
            due = int((loop.time() - begun) * rate) + 1 - self.counts.generated
            if due > 0:
                batch = [
                    {
                        "event": self.rng.choice(self.events),
                        "data": {"FIELDS": {"ID": str(self.rng.randint(1, entities))}},
                    }
                    for _ in range(due)
                ]
                answer = (
                    (await http.post("/_emulator/events", json={"events": batch}))
                    .raise_for_status()
                    .json()
                )
                coalesced = int(answer.get("coalesced", 0))
                self.counts.generated += due
                self.counts.coalesced += coalesced
                self.counts.ignored += int(answer.get("ignored", 0))
                if coalesced:
                    self.screen.message(
                        f"  (portal: {coalesced} change(s) merged into events still waiting "
                        f"in its queue; {self.counts.coalesced} coalesced so far)"
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), tick)

    def _read_metrics(self, service: Service) -> None:
        registry = service.metrics.registry
        self.counts.published = _sample(registry, "events_published_total", self.events)
        self.counts.cleared = _sample(registry, "events_cleared_total", self.events)

    async def _refresh(self, service: Service, http: httpx.AsyncClient) -> None:
        c = self.counts
        self._read_metrics(service)
        queue = (await http.get("/_emulator/queue")).raise_for_status().json()
        c.waiting = int(queue["free"]) + sum(int(n) for n in queue["reserved"].values())

    async def _status_loop(self, service: Service, http: httpx.AsyncClient) -> None:
        while True:
            await asyncio.sleep(1)
            with contextlib.suppress(httpx.HTTPError):
                await self._refresh(service, http)
            self.screen.status()

    async def _drain(self, service: Service, http: httpx.AsyncClient) -> bool:
        """Wait until the portal queue is empty and every published event reached us."""
        self.screen.end_status()
        print("stopping: generator stopped, letting the bridge drain (Ctrl-C again to skip)")
        # Wake the bridge now rather than after minTimeout or the next safety drain.
        with contextlib.suppress(httpx.HTTPError):
            await http.post("/_emulator/notify")
        deadline = time.monotonic() + DRAIN_TIMEOUT
        c = self.counts
        while not self.abort.is_set() and time.monotonic() < deadline:
            await self._refresh(service, http)
            if c.waiting == 0 and c.cleared >= c.expected and c.consumed >= c.published:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.abort.wait(), 0.2)
        return False


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if not args.rate > 0:
        print("bitrix24-bridge demo: --rate must be positive")
        return 2
    if not any(e.strip() for e in args.events.split(",")):
        print("bitrix24-bridge demo: --events names no event")
        return 2
    # The bridge logs only what goes wrong, in text: the demo's own lines are the show.
    logs.configure("WARNING", "text")
    try:
        return asyncio.run(Demo(args).run())
    except KeyboardInterrupt:  # before the demo's own handlers were installed
        return 130
