"""The orphan scan, in process (``tests/bitrix24/inprocess.py``): a few pages of
``event.offline.list`` a pass, going on after the last ``ID`` it saw, until a sweep is complete;
reservations the journal knows are not orphans. Over sockets, with the drain loop and a real
broker: ``test_offline_queue_rabbitmq.py``.
"""

from __future__ import annotations

from collections import Counter

import pytest

from bridge.bitrix24 import orphans
from bridge.bitrix24.offline_queue import GET
from bridge.bitrix24.orphans import LIST
from tests.bitrix24.inprocess import MakeRig, Rig

PAGE = 50


async def reserve_behind_the_bridge(rig: Rig, pages: int) -> list[str]:
    """Reservations nobody journaled: orphans, as far as the queue knows."""
    found = []
    for _ in range(pages):
        answer = await rig.queue.client.call(GET, {"clear": 0, "limit": PAGE}, idempotent=False)
        found.append(answer.result["process_id"])
    return found


def list_after_ids(rig: Rig) -> list[int]:
    """The ``>ID`` each ``event.offline.list`` call asked for, in order."""
    return [int(params["filter"][">ID"]) for params in rig.tap.commands(LIST)]


async def test_the_scan_is_bounded_per_step_and_resumes_where_it_stopped(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orphans, "PAGES_PER_PASS", 2)
    rig = await rigs()
    await rig.add(range(5 * PAGE + 10))
    reserved = await reserve_behind_the_bridge(rig, 5)
    scan = rig.queue.orphans

    found = await scan.step(set())
    assert found == reserved[:2]
    assert scan.suspected  # the sweep is not over
    first = list_after_ids(rig)
    assert len(first) == 2
    found += await scan.step(set())
    after = list_after_ids(rig)[len(first)]
    assert after > first[-1] > 0, "the second step started the sweep again"
    found += await scan.step(set())
    assert found == reserved
    assert not scan.suspected  # a whole sweep ran after the last doubt
    assert len(rig.tap.commands(LIST)) <= 3 * 2


async def test_known_reservations_are_not_orphans(rigs: MakeRig) -> None:
    rig = await rigs()
    await rig.add(range(2 * PAGE))
    first, second = await reserve_behind_the_bridge(rig, 2)
    assert await rig.queue.orphans.step({first}) == [second]


async def test_passes_recover_every_orphan_a_few_pages_at_a_time(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orphans, "PAGES_PER_PASS", 2)
    rig = await rigs()
    await rig.add(range(5 * PAGE + 10))
    await reserve_behind_the_bridge(rig, 5)
    passes = 0
    while (await rig.reserved_ids()) or (await rig.portal_queue())["free"]:
        await rig.queue.run_pass(full_check=passes == 0)
        passes += 1
        assert passes <= 5, "the orphans are not found"
    assert passes == 3  # two pages of orphans a pass: 2 + 2 + 1
    assert Counter(rig.stored_ids()) == Counter(str(n) for n in range(5 * PAGE + 10))
    assert await rig.state.journal_entries(rig.member_id, "") == []
