"""The emulator in a process of its own, so it never competes with the benchmark for the GIL.

``python -m bench.emulator_server '{"rate_limit": null, ...}'`` starts an emulator with that
:class:`EmulatorConfig` (``"portals": N`` for a farm, ``"call_log": PATH`` for a call log file),
prints one JSON line ``{"port": N, "base_url": ..., "portals": [base URLs]}`` and serves until
its standard input closes (or SIGTERM). It adds one route, ``GET /_bench/requests``: the number of
HTTP requests under ``/rest/`` so far (a ``batch`` counts once), which the emulator's own
``/_emulator/calls`` cannot tell apart from the sub-calls.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from bridge.emulators.bitrix24 import EmulatorConfig, ThreadedServer, create_emulator_app
from bridge.emulators.bitrix24.calllog import CallLog
from bridge.emulators.bitrix24.farm import Farm, addresses


class RequestCounter:
    """ASGI wrapper: counts REST requests and answers ``/_bench/requests``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.rest = 0
        self.oauth = 0
        self.started = time.time()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/rest/"):
                self.rest += 1
            elif path.startswith("/oauth/"):
                self.oauth += 1
            elif path == "/_bench/requests":
                body = {"rest": self.rest, "oauth": self.oauth, "now": time.time()}
                await JSONResponse(body)(scope, receive, send)
                return None
        # The emulator's app may return a marker that makes uvicorn drop the answer: keep it.
        return await self.app(scope, receive, send)


def main(argv: list[str]) -> int:
    options: dict[str, Any] = json.loads(argv[0]) if argv else {}
    # Besides EmulatorConfig's fields: "portals" (a farm of that many) and "call_log" (a path).
    portals = int(options.pop("portals", 1))
    call_log = options.pop("call_log", None)
    config = EmulatorConfig(**options)
    server = ThreadedServer(config.host, config.port, also=addresses(config.host, portals)[1:])
    port = server.bind()
    config = dataclasses.replace(config, port=port)
    farm = Farm.of(config, portals, CallLog(path=call_log))
    server.serve(RequestCounter(create_emulator_app(config, farm=farm)))
    bases = [p.base_url for p in farm.portals]
    print(json.dumps({"port": port, "base_url": config.base_url, "portals": bases}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()  # the parent closes it to stop us (or dies)
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
