"""The TCP proxy (``bench.tcpproxy``) as a fixture: a link to the test broker to cut or freeze."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bench.tcpproxy import TcpProxy

__all__ = ["TcpProxy", "amqp_proxy"]


@pytest.fixture
async def amqp_proxy() -> AsyncIterator[TcpProxy]:
    """A started proxy to the test broker; use ``amqp_proxy.url(amqp_url)`` to connect through."""
    async with TcpProxy() as proxy:
        yield proxy
