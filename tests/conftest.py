from collections.abc import AsyncIterator

import pytest
from hypothesis import settings

from bridge.emulators.bitrix24 import EmulatorServer
from tests.harness import Portal, emulated_portal

# Properties, not timings: a busy CI machine must not turn a slow example into a failure.
settings.register_profile("bridge", deadline=None)
settings.load_profile("bridge")

pytest_plugins = [
    "pytester",  # tests/test_seeds.py runs a small suite of its own
    "tests.seeds",
    "tests.plugins.broker",
    "tests.plugins.tcpproxy",
    "tests.plugins.emulator",
    "tests.plugins.postgres",
]


@pytest.fixture
async def emulated() -> AsyncIterator[tuple[EmulatorServer, Portal, int]]:
    """An emulated portal whose notifications go to a bridge port chosen in advance."""
    async with emulated_portal() as running:
        yield running
