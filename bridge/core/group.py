"""A group of sources the service runs: the Bitrix24 portals, the Diadoc boxes.

The service knows no source by name: it opens each group with the shared resources, starts
and stops the drainers the group hands it, calls ``poll`` on every poll tick and asks for
``health`` (the ``/readyz`` detail). Adding a source is adding a group.
"""

from __future__ import annotations

from typing import Protocol

from bridge.core.drainer import Drainer


class SourceGroup(Protocol):
    async def open(self) -> None:
        """Load what is known (portals, boxes) and make a drainer for each; do not start them."""
        ...

    def drainers(self) -> list[Drainer]:
        """The group's drain loops, for the service to start, stop and watch."""
        ...

    async def poll(self) -> None:
        """One poll tick (``BRIDGE_POLL_INTERVAL``): safety drains, checks, requests."""
        ...

    def health(self) -> list[dict[str, object]]:
        """One entry per drained thing: ``state`` (draining, stopped) and why."""
        ...

    async def close(self) -> None:
        """After the drainers stopped: finish background work (a token being saved, say)."""
        ...
