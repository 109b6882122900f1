"""``bitrix24-bridge emulator``: run a Bitrix24 portal emulator until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

import uvicorn.config

from bridge.emulators.bitrix24.calllog import DEFAULT_CAPACITY
from bridge.emulators.bitrix24.config import EmulatorConfig
from bridge.emulators.bitrix24.server import EmulatorServer


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside each option; the examples kept one per line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitrix24-bridge emulator",
        description=(
            "Emulate a Bitrix24 portal with one installed local application: REST under /rest/, "
            "OAuth at /oauth/token/, notifications POSTed to --handler, and a control API under "
            "/_emulator/ (add events, read the queue, inject faults)."
        ),
        epilog=(
            "examples:\n"
            "  bitrix24-bridge emulator --port 8090 --handler http://127.0.0.1:8080/bitrix24/events\n"
            "  bitrix24-bridge emulator --port 8090 --auto-bind --rate-limit 5 --rate-burst 250\n"
            "  bitrix24-bridge emulator --port 8090 --portals 24 --call-log calls.jsonl"
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on (0 = any)")
    parser.add_argument(
        "--public-host", help="host name the portal announces in its endpoints (default: --host)"
    )
    parser.add_argument(
        "--handler", metavar="URL", help="install URL and default notification handler"
    )
    parser.add_argument(
        "--min-timeout", type=float, default=1.0, help="default minTimeout of ONOFFLINEEVENT (s)"
    )
    parser.add_argument(
        "--rate-limit", type=float, default=2.0, help="leaky bucket drain, requests/s (0 = off)"
    )
    parser.add_argument("--rate-burst", type=int, default=50, help="leaky bucket size")
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="access token life (s)")
    parser.add_argument(
        "--operating-limit",
        "--operating-budget",  # the former name
        dest="operating_limit",
        type=float,
        default=420.0,
        help="operating seconds per method per 10 minutes; above it the method is banned "
        "for 300 s (480 on older portals)",
    )
    parser.add_argument(
        "--cleanup-interval",
        type=float,
        default=86400.0,
        help="seconds between runs of the queue's cleanup agent (deletes events older than "
        "2,952,000 s)",
    )
    parser.add_argument(
        "--op-cost-per-call", type=float, default=0.0, help="modelled operating seconds per call"
    )
    parser.add_argument(
        "--op-cost-per-row", type=float, default=0.0, help="modelled operating seconds per row"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay of every REST answer")
    parser.add_argument(
        "--no-offline-extended",
        action="store_true",
        help="portal without rest_offline_extended: clear=0 answers WRONG_LICENSE",
    )
    parser.add_argument(
        "--auto-bind", action="store_true", help="queue every event, bound offline or not"
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve HTTPS with this certificate (for clients that only speak https)",
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    parser.add_argument("--client-id", help="fixed client id (default: random)")
    parser.add_argument("--client-secret", help="fixed client secret (default: random)")
    parser.add_argument("--application-token", help="fixed application token (default: random)")
    parser.add_argument("--member-id", help="fixed member id (default: random)")
    parser.add_argument(
        "--portals",
        type=_at_least(1),
        default=1,
        help="portals to serve, each with its own member id, application token, queue and "
        "limits, on its own loopback address (--host, the next address, ...) with one port; "
        "one OAuth server for all; the farm's control API is under /_farm/",
    )
    parser.add_argument(
        "--call-log",
        metavar="PATH",
        help="also append every REST and OAuth request to this file, one JSON line each",
    )
    parser.add_argument(
        "--call-log-size",
        type=_at_least(0),
        default=DEFAULT_CAPACITY,
        help="requests the call log keeps in memory (GET /_farm/calls?since=N); 0 = file only",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(
                f"expected a whole number of {minimum} or more, got {value!r}"
            )
        return number

    return parse


def config_from(args: argparse.Namespace) -> EmulatorConfig:
    config = EmulatorConfig(
        host=args.host,
        port=args.port,
        public_host=args.public_host,
        handler_url=args.handler,
        min_timeout=args.min_timeout,
        rate_limit=args.rate_limit or None,
        rate_burst=args.rate_burst,
        token_ttl=args.token_ttl,
        operating_limit=args.operating_limit,
        cleanup_interval=args.cleanup_interval,
        op_cost_per_call=args.op_cost_per_call,
        op_cost_per_row=args.op_cost_per_row,
        latency_ms=args.latency_ms,
        offline_extended=not args.no_offline_extended,
        auto_bind=args.auto_bind,
        tls_certfile=args.tls_cert,
        tls_keyfile=args.tls_key,
    )
    for name in ("client_id", "client_secret", "application_token", "member_id"):
        value = getattr(args, name)
        if value:
            setattr(config, name, value)
    return config


def _farm_banner(server: EmulatorServer) -> str:
    farm = server.farm
    assert farm is not None
    last = farm.portals[-1].config
    return (
        f"Bitrix24 portal farm: {len(farm.portals)} portals, {server.config.domain} to "
        f"{last.domain}; control API {server.config.base_url}/_farm/ (GET portals for each "
        "one's member id, endpoint and application token). The first portal:"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        server = EmulatorServer(
            config_from(args),
            portals=args.portals,
            call_log_path=args.call_log,
            call_log_size=args.call_log_size,
            log_level=args.log_level,
            log_config=uvicorn.config.LOGGING_CONFIG,
        )
    except ValueError as exc:  # --portals with a --host that has no room for them, say
        print(f"emulator: {exc}", file=sys.stderr)
        return 1
    if args.call_log:
        try:
            open(args.call_log, "a").close()  # only a check that it is writable
        except OSError as exc:
            print(f"emulator: cannot write the call log: {exc}", file=sys.stderr)
            return 1
    try:
        server.start()
    except OSError as exc:
        print(f"emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # uvicorn refused to start (a bad --tls-cert, say)
        print(f"emulator: {exc}", file=sys.stderr)
        return 1
    portal = server.portal
    assert portal is not None
    refresh = server.run_in_loop(lambda: portal.tokens.issue(1, portal.now()).refresh_token)
    config = server.config
    if args.portals > 1:
        print(_farm_banner(server), flush=True)
    print(
        "Bitrix24 portal emulator\n"
        f"  domain             {config.domain}\n"
        f"  client endpoint    {config.client_endpoint}\n"
        f"  OAuth URL          {server.oauth_url} (token endpoint {server.token_url})\n"
        f"  control API        {config.base_url}/_emulator/\n"
        f"  handler            {config.handler_url or '(none; bind ONOFFLINEEVENT)'}\n"
        f"  client id          {config.client_id}\n"
        f"  client secret      {config.client_secret}\n"
        f"  application token  {config.application_token}\n"
        f"  member id          {config.member_id}\n"
        f"  refresh token      {refresh}  (admin; GET /_emulator/app for another)",
        flush=True,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
