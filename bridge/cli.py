"""The ``bitrix24-bridge`` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from bridge import __version__, logs
from bridge.core.errors import BridgeError, ConfigError
from bridge.diadoc.settings import load_diadoc_settings
from bridge.settings import Settings, load_settings

log = logging.getLogger("bridge")

EXIT_CONFIG = 2


# Every subcommand: (one-line help, description, example lines). `--help` shows all three.
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "serve": (
        "HTTP server and drainer (the container's default)",
        "Answer Bitrix24 notifications on BRIDGE_HTTP_HOST:BRIDGE_HTTP_PORT (/bitrix24/events, "
        "/livez, /readyz, /metrics) and drain every known portal into RabbitMQ until SIGTERM; "
        "the page in flight is finished within 20 seconds.",
        (
            "BRIDGE_CLIENT_ID=local.abc BRIDGE_CLIENT_SECRET=... bitrix24-bridge serve",
            "BRIDGE_LOG_FORMAT=text bitrix24-bridge serve",
        ),
    ),
    "drain": (
        "drain every known portal until empty, then exit (cron mode)",
        "Drain every known portal (and Diadoc box) once until its queue is empty, then exit. "
        "Exit code 0 only if nothing was left behind because of an error.",
        ("bitrix24-bridge drain", "bitrix24-bridge drain || echo 'events left behind'"),
    ),
    "status": (
        "portals, token state, in-flight reservations, queue depth",
        "Show every known portal: its token state, the process_ids in flight, the upstream "
        "queue depth and, when the portal refuses the bridge, why its drain is stopped. Never "
        "refreshes a token.",
        ("bitrix24-bridge status", "bitrix24-bridge status --json --offline"),
    ),
    "bind": (
        "make sure the offline bindings and the ONOFFLINEEVENT handler exist",
        "Bind every event of BRIDGE_EVENTS as an offline event and register the ONOFFLINEEVENT "
        "handler {BRIDGE_PUBLIC_URL}/bitrix24/events on every known portal. Safe to repeat.",
        (
            "BRIDGE_EVENTS=ONCRMLEADADD,ONCRMDEALUPDATE bitrix24-bridge bind",
            "BRIDGE_PUBLIC_URL=https://b24-bridge.example.com bitrix24-bridge bind",
        ),
    ),
    "backup": (
        "copy the state file consistently, while serve runs",
        "Copy the state file (BRIDGE_STATE_PATH) to PATH with SQLite's online backup API: a "
        "consistent snapshot even while serve writes. The copy is owner-only (it holds "
        "administrator tokens) and checked before it takes PATH's name.",
        (
            "bitrix24-bridge backup /tmp/state-backup.sqlite3",
            "bitrix24-bridge backup --force /backups/bridge.sqlite3",
        ),
    ),
    "parked": (
        "list events parked after the broker kept refusing them; --replay drains them again",
        "List the events parked with event.offline.error after BRIDGE_POISON_ATTEMPTS failed "
        "publishes (they stay in the portal, readable with get error=1). --replay drains them "
        "again; while serve runs, the request is handed to it.",
        (
            "bitrix24-bridge parked",
            "bitrix24-bridge parked --json",
            "bitrix24-bridge parked --replay",
        ),
    ),
    "asyncapi": (
        "print the AsyncAPI 3.0 document of the messages the bridge publishes",
        "Print the AsyncAPI 3.0 document describing the exchanges, routing keys, headers and "
        "bodies of the messages this configuration publishes (BRIDGE_EVENTS, templates, Diadoc).",
        ("bitrix24-bridge asyncapi", "bitrix24-bridge asyncapi --format json"),
    ),
    "emulator": (
        "run the Bitrix24 portal emulator (see 'emulator --help')",
        "",
        (),
    ),
    "demo": (
        "emulator + bridge + RabbitMQ consumer, showing events flow",
        "",
        (),
    ),
}
# In scaled mode (BRIDGE_STATE_URL) the serving replicas own the portals' shards and tokens.
SCALED_REFUSALS = {
    "drain": "'drain' drains alone, and in scaled mode (BRIDGE_STATE_URL) the serving replicas "
    "hold the portals' leases: run 'serve' replicas instead",
    "backup": "'backup' copies the SQLite state file; in scaled mode (BRIDGE_STATE_URL) back "
    "up the PostgreSQL database with pg_dump",
}
# These two have parsers of their own (bridge.emulators.bitrix24.cli, bridge.demo).
OWN_PARSERS = ("emulator", "demo")


def examples(*lines: str) -> str:
    """An argparse epilog listing example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitrix24-bridge",
        description="Moves Bitrix24 offline events into RabbitMQ. Configured by BRIDGE_*.",
        epilog=examples("bitrix24-bridge serve", "bitrix24-bridge COMMAND --help"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (summary, description, lines) in COMMANDS.items():
        if name in OWN_PARSERS:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        commands[name] = sub.add_parser(
            name,
            help=summary,
            description=description,
            epilog=examples(*lines),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    status = commands["status"]
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--offline", action="store_true", help="do not ask the portals for their queue depth"
    )
    backup = commands["backup"]
    backup.add_argument("path", metavar="PATH", help="where to write the copy")
    backup.add_argument("--force", action="store_true", help="replace PATH if it exists")
    parked = commands["parked"]
    parked.add_argument("--json", action="store_true", help="machine-readable output")
    parked.add_argument(
        "--replay",
        action="store_true",
        help="drain parked events again (handed to the serving process when one runs)",
    )
    asyncapi = commands["asyncapi"]
    asyncapi.add_argument("--format", choices=("yaml", "json"), default="yaml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # The emulator and the demo have options of their own.
    if args_list and args_list[0] in ("emulator", "demo"):
        return _development_command(args_list[0], args_list[1:])
    args = _parser().parse_args(args_list)
    try:
        settings = load_settings()
        logs.configure(settings.log_level, settings.log_format)
        if settings.state_url is not None and args.command in SCALED_REFUSALS:
            raise ConfigError(SCALED_REFUSALS[args.command])
        if args.command == "serve":
            return _run(_serve(settings))
        if args.command == "drain":
            return _run(_drain(settings))
        if args.command == "status":
            return _run(_status(settings, as_json=args.json, offline=args.offline))
        if args.command == "bind":
            return _run(_bind(settings))
        if args.command == "parked":
            return _run(_parked(settings, as_json=args.json, replay=args.replay))
        if args.command == "asyncapi":
            from bridge.asyncapi import build, load_diadoc_layout, render

            sys.stdout.write(render(build(settings, load_diadoc_layout()), args.format))
            return 0
        if args.command == "backup":
            return _backup(settings, args.path, force=args.force)
    except BridgeError as exc:
        print(f"bitrix24-bridge: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects other commands


def _development_command(name: str, argv: list[str]) -> int:
    """The emulator and the demo: in the Python package, left out of the container image."""
    try:
        if name == "emulator":
            from bridge.emulators.bitrix24.cli import main as emulator

            return emulator(argv)
        from bridge.demo import main as demo

        status: int = demo(argv)
        return status
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith(("bridge.emulators", "bridge.demo")):
            raise
        print(
            f"bitrix24-bridge: error: '{name}' is not part of this installation (the image "
            "leaves the emulators and the demo out; pip install bitrix24-bridge has them)",
            file=sys.stderr,
        )
        return EXIT_CONFIG


def _run(coro: Any) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        result: int = runner.run(coro)
    return result


def _loop_factory() -> Any:
    # uvloop's transports cut the per-frame cost of publishing (each AMQP frame is a write).
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return None
    return uvloop.new_event_loop


# A drain allocates and drops hundreds of thousands of small objects (rows, messages, futures)
# per second, and the default thresholds (700, 10, 10) then run a full collection every few
# hundred milliseconds over every module object too: 17 % of a 50,000-event drain's CPU, in
# 45 ms pauses. With the start-up heap frozen and a larger first generation it is 2 %.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Once everything long-lived is imported: leave it out of collections, collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _serve(settings: Settings) -> int:
    import uvicorn

    from bridge.app import create_app
    from bridge.server import Server
    from bridge.service import SHUTDOWN_BOUND, Service

    tune_gc()
    service = Service(settings, diadoc=load_diadoc_settings())
    try:
        await service.open()
    except BaseException:
        await service.close(grace=1)
        raise
    app = create_app(settings, service=service)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=int(SHUTDOWN_BOUND),
        server_header=False,
        # Beyond this many connections uvicorn answers 503 instead of exhausting the process.
        limit_concurrency=256,
    )
    server = Server(config)
    log.info("serving", extra={"host": settings.http_host, "port": settings.http_port})
    await server.serve()
    return 0 if server.started else 1


async def _drain(settings: Settings) -> int:
    from bridge.service import Service

    tune_gc()
    service = Service(settings, diadoc=load_diadoc_settings())
    try:
        await service.open(purpose="drain")
        drainers = service.drainers()
        if not drainers:
            log.warning("no portal or feed known: nothing to drain")
            return 0
        results = [await d.run_once(full_check=True) for d in drainers]
    finally:
        await service.close()
    left = sum(1 for ok in results if not ok)
    if left:
        log.error("drain left events behind", extra={"sources_failed": left})
    return 0 if not left else 1


async def _status(settings: Settings, *, as_json: bool, offline: bool) -> int:
    from bridge.bitrix24.tools import portal_status

    report = await portal_status(settings, ask_upstream=not offline, diadoc=load_diadoc_settings())
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    portals = report["portals"]
    if not portals:
        print("no portals known")
    for p in portals:
        expires = p["access_token_expires_at"]
        left = f"{int(expires - time.time())} s" if expires else "none"
        print(f"{p['domain']}  member_id={p['member_id']}  status={p['status']}")
        token = "present" if p["refresh_token"] else "missing"
        print(f"  refresh token: {token}; access token expires in: {left}")
        print(f"  in-flight process_ids: {', '.join(p['in_flight']) or 'none'}")
        depth = p.get("queue_depth")
        print(
            f"  upstream queue depth: {depth if depth is not None else 'unknown'}"
            + (f" ({p['upstream_error']})" if p.get("upstream_error") else "")
        )
        if p.get("stopped"):
            print(f"  drain stopped: {p['stopped']}")
        if p.get("binding_error"):
            print(f"  binding failed: {p['binding_error']}")
    for box in report["diadoc_boxes"]:
        lag = box.get("lag_s")
        print(f"diadoc box {box['box_id']}  cursor={box.get('cursor') or 'none'}  lag={lag} s")
    return 0


async def _parked(settings: Settings, *, as_json: bool, replay: bool) -> int:
    from bridge.bitrix24.tools import parked_events, request_replay

    if replay:
        results = await request_replay(settings)
        for domain, outcome in results.items():
            print(f"{domain}: {outcome}")
        return 0 if all(not r.startswith("failed") for r in results.values()) else 1
    report = await parked_events(settings)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    for portal in report["portals"]:
        rows, local = portal["parked"], portal["kept_in_state_file"]
        total = portal.get("total", len(rows))
        print(f"{portal['domain']}: {total} parked in the portal, {len(local)} in the state file")
        if portal.get("upstream_error"):
            print(f"  portal not asked: {portal['upstream_error']}")
        for row in rows:
            print(f"  {row['ID']}  {row['EVENT_NAME']}  {row['TIMESTAMP_X']}  {row['MESSAGE_ID']}")
        for item in local:
            print(f"  state file {item['ref']}: {item['reason']}")
    return 0


async def _bind(settings: Settings) -> int:
    from bridge.bitrix24.tools import bind_all

    results = await bind_all(settings)
    if settings.state_url is not None:
        for domain in results:
            print(f"{domain}: handed to the serving replicas")
        return 0
    for domain, bound in results.items():
        print(
            f"{domain}: {'bound ' + ', '.join(bound) if bound else 'all bindings already present'}"
        )
    return 0


def _backup(settings: Settings, path: str, *, force: bool) -> int:
    from bridge.state.backup import backup

    size = backup(settings.state_path, path, force=force)
    print(f"state {settings.state_path} backed up to {path} ({size} bytes)")
    return 0
