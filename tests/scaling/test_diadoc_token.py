"""The Diadoc OpenID session shared by replicas: renewed under a database lock, never twice.

Two replicas (each its own auth and its own connection pool on one PostgreSQL state) ask for a
token at the same moment, first with the same bootstrap refresh token, then after the provider
forgot their access tokens. The emulated provider refuses, and counts, any refresh token
presented a second time.
"""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client import CollectorRegistry

from bridge.diadoc.auth import DiadocAuth
from bridge.diadoc.metrics import diadoc_metrics
from bridge.diadoc.sharded import OIDC_LOCK
from bridge.emulators.diadoc import DiadocEmulatorServer
from bridge.state.pg import PgState


def _auth(
    diadoc: DiadocEmulatorServer, state: PgState, http: httpx.AsyncClient, boot: str
) -> DiadocAuth:
    return DiadocAuth(
        http,
        token_url=diadoc.token_url,
        client_id=diadoc.model.client_id,
        client_secret=diadoc.model.client_secret,
        bootstrap_refresh_token=boot,
        state=state,
        metrics=diadoc_metrics(CollectorRegistry()),
        exclusive=lambda: state.exclusive(OIDC_LOCK),
    )


async def test_replicas_renew_the_shared_token_one_at_a_time(pg_url: str) -> None:
    states = [await PgState.open(pg_url), await PgState.open(pg_url)]
    try:
        with DiadocEmulatorServer() as diadoc:
            boot = diadoc.model.issue_refresh_token()
            async with httpx.AsyncClient() as http:
                a, b = (_auth(diadoc, s, http, boot) for s in states)
                first = await asyncio.gather(a.token(), b.token())
                # The second one under the lock found the first one's token and took it.
                assert first[0] == first[1]
                assert diadoc.model.refreshes == 1
                diadoc.model.expire_tokens()
                second = await asyncio.gather(
                    a.refresh(failed_token=first[0]), b.refresh(failed_token=first[1])
                )
                assert second[0] == second[1] != first[0]
                assert diadoc.model.refreshes == 2
                assert diadoc.model.refused_refreshes == 0
                # A replica started later adopts the stored token instead of renewing.
                late = _auth(diadoc, states[0], http, boot)
                assert await late.token() == second[0]
                assert diadoc.model.refreshes == 2
    finally:
        for state in states:
            await state.close()
