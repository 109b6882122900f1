from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from bridge.emulators.diadoc import DiadocEmulator, DiadocEmulatorServer
from bridge.state import State
from tests.state_backends import Backend


@pytest.fixture
def diadoc() -> Iterator[DiadocEmulatorServer]:
    """The Diadoc emulator with one box, ``box-a``."""
    with DiadocEmulatorServer(DiadocEmulator(("box-a",))) as server:
        yield server


@pytest.fixture
async def state(state_backend: Backend) -> AsyncIterator[State]:
    """The SQLite file and PostgreSQL in turn: the client keeps its rotating token in either."""
    state = await state_backend.open()
    # PgState mirrors State method for method; the Diadoc classes name the SQLite one.
    yield state  # type: ignore[misc]
    await state.close()
