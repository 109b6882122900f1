"""A Diadoc client pointed at the emulator, with back-off short enough for tests."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from bridge.diadoc.auth import DiadocAuth
from bridge.diadoc.client import DiadocClient
from bridge.diadoc.metrics import diadoc_metrics
from bridge.diadoc.ticks import timestamp
from bridge.emulators.diadoc import DiadocEmulatorServer
from bridge.state import State

# One page of every box's feed, from the start of time.
REQUEST: dict[str, Any] = {
    "Filter": {"FromTimestamp": {"Ticks": 0}, "ToTimestamp": timestamp(4e9)},
    "Limit": 100,
}


def emulated_client(
    diadoc: DiadocEmulatorServer,
    state: State,
    http: httpx.AsyncClient,
    bootstrap: str | None,
    *,
    secret: str | None = None,
    version: str = "V5",
    registry: CollectorRegistry | None = None,
) -> DiadocClient:
    # The registry's own metrics object: a feed built on the same registry shares it.
    metrics = diadoc_metrics(registry or CollectorRegistry())
    auth = DiadocAuth(
        http,
        token_url=diadoc.token_url,
        client_id=diadoc.model.client_id,
        client_secret=secret or diadoc.model.client_secret,
        bootstrap_refresh_token=bootstrap,
        state=state,
        metrics=metrics,
    )
    return DiadocClient(
        http,
        auth,
        api_url=diadoc.api_url,
        api_version=version,
        metrics=metrics,
        backoff_base=0.01,
        backoff_cap=0.05,
    )
