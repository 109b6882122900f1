"""The HTTP application: webhook, probes, metrics; one lifespan that owns the service."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.bitrix24 import webhook
from bridge.diadoc.settings import DiadocSettings
from bridge.metrics import Metrics
from bridge.service import Service
from bridge.settings import Settings


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    metrics: Metrics | None = None,
    service: Service | None = None,
    diadoc: DiadocSettings | None = None,
) -> Starlette:
    svc = service or Service(settings, transport=transport, metrics=metrics, diadoc=diadoc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not svc.opened:
            await svc.open()
        await svc.start_draining()
        try:
            yield
        finally:
            await svc.close()

    async def events(request: Request) -> Response:
        return await webhook.handle(request, svc)

    async def livez(request: Request) -> Response:
        problem = svc.liveness()
        if problem:
            return JSONResponse({"status": "failing", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problem = svc.readiness()
        detail = svc.portal_health()
        if problem:
            return JSONResponse(
                {"status": "not ready", "reason": problem, "portals": detail}, status_code=503
            )
        return JSONResponse({"status": "ready", "portals": detail})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/bitrix24/events", events, methods=["POST"]),
            Route("/livez", livez, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.service = svc
    return app
