"""The burst scenario's yardstick: a Starlette app that only answers 200, served like the bridge.

``python -m bench.bare_app PORT`` runs it under uvicorn with the same options as
``bitrix24-bridge serve`` (uvicorn's defaults otherwise, so the same loop and HTTP parser).
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def ok(request: Request) -> Response:
    # The same answer the bridge gives an accepted notification, without reading the body.
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/bitrix24/events", ok, methods=["POST"]),
        Route("/livez", ok, methods=["GET"]),
    ]
)


def main(argv: list[str]) -> int:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=int(argv[0]),
        log_config=None,
        lifespan="on",
        access_log=False,
        server_header=False,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
