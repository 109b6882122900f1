"""Without the lease, a portal client sends nothing and a fenced publisher publishes nothing."""

from __future__ import annotations

import httpx
import pytest

from bridge.amqp.fake import MemoryPublisher
from bridge.amqp.protocol import OutgoingMessage
from bridge.bitrix24.oauth import OAuthClient
from bridge.bitrix24.upstream import PortalClient
from bridge.core.errors import LeaseLost
from bridge.metrics import Metrics
from bridge.scaling.fencing import Fence, FencedPublisher
from bridge.state import Portal

PORTAL = Portal(
    member_id="m1",
    domain="portal.example",
    client_endpoint="https://portal.example/rest/",
    server_endpoint="",
    access_token="a",
    refresh_token="r",
    application_token="t",
    expires_at=0.0,
    status="active",
)


class Held:
    """The lease manager's answer, switched by the test."""

    def __init__(self) -> None:
        self.held = True

    def __call__(self, shard: int, epoch: int) -> bool:
        return self.held


async def test_a_client_past_its_lease_sends_no_request() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"result": True, "time": {}})

    held = Held()
    fence = Fence("r1", 3, 7, held)
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        oauth = OAuthClient(
            http, oauth_url="https://oauth.example", client_id="c", client_secret="s"
        )

        async def save(portal: Portal) -> None:
            return None

        client = PortalClient(
            PORTAL,
            http=http,
            oauth=oauth,
            save=save,
            metrics=Metrics(),
            rate_limit=100,
            rate_burst=100,
            guard=fence.check,
            headers={"X-Bridge-Replica": "r1", "X-Bridge-Epoch": "7"},
        )
        await client.call("profile", {}, idempotent=True)
        assert [(r.headers["x-bridge-replica"], r.headers["x-bridge-epoch"]) for r in sent] == [
            ("r1", "7")
        ]
        held.held = False
        with pytest.raises(LeaseLost):
            await client.call("profile", {}, idempotent=True)
    assert len(sent) == 1


async def test_a_fenced_publisher_publishes_nothing_past_its_lease() -> None:
    inner = MemoryPublisher()
    held = Held()
    publisher = FencedPublisher(inner, Fence("r1", 0, 1, held))
    message = OutgoingMessage(
        exchange="x",
        routing_key="k",
        body=b"{}",
        message_id="m:1:t",
        type="E",
        timestamp=None,
        headers={},
        key="m:1:t",
    )
    await publisher.publish_pages([[message]])
    held.held = False
    with pytest.raises(LeaseLost):
        await publisher.publish_pages([[message]])
    with pytest.raises(LeaseLost):
        await publisher.publish([message])
    assert len(inner.stored) == 1


async def test_a_client_for_a_portal_taken_over_starts_with_the_bucket_full() -> None:
    """The previous owner may have filled the portal's bucket: no burst until it drains."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"result": True, "time": {}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        oauth = OAuthClient(
            http, oauth_url="https://oauth.example", client_id="c", client_secret="s"
        )

        async def save(portal: Portal) -> None:
            return None

        def client(*, bucket_full: bool = False) -> PortalClient:
            return PortalClient(
                PORTAL,
                http=http,
                oauth=oauth,
                save=save,
                metrics=Metrics(),
                rate_limit=10,
                rate_burst=20,
                bucket_full=bucket_full,
            )

        fresh, taken_over = client(), client(bucket_full=True)
        for each in (fresh, taken_over):
            await each.call("profile", {}, idempotent=True)
        # One request in a fresh bucket; a full one (less what leaked while the first waited).
        assert fresh.limiter.has_capacity(10)
        assert not taken_over.limiter.has_capacity(10)
