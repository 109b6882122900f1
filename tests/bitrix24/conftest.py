from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.bitrix24.inprocess import MakeRig, Rig, make_rig


@pytest.fixture
async def rigs() -> AsyncIterator[MakeRig]:
    """Offline queues on an in-process portal and the in-memory publisher, closed afterwards."""
    made: list[Rig] = []

    async def make(**kw: Any) -> Rig:
        made.append(await make_rig(**kw))
        return made[-1]

    yield make
    for rig in made:
        await rig.close()
