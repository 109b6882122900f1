from collections.abc import AsyncIterator

import pytest

from bridge.emulator import EmulatorServer
from tests.harness import Portal, emulated_portal

pytest_plugins = [
    "tests.plugins.broker",
    "tests.plugins.tcpproxy",
    "tests.plugins.emulator",
]


@pytest.fixture
async def emulated() -> AsyncIterator[tuple[EmulatorServer, Portal, int]]:
    """An emulated portal whose notifications go to a bridge port chosen in advance."""
    async with emulated_portal() as running:
        yield running
