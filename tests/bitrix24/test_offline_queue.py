"""One pass of the offline queue, in process: the emulator through ``httpx.ASGITransport`` and
the in-memory publisher (``tests/bitrix24/inprocess.py``). What is cleared is exactly what the
publisher confirmed; what it refused stays reserved and comes back; a failed clear is retried as
a clear. The same guarantees over sockets and a real broker: ``test_offline_queue_rabbitmq.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from bridge.bitrix24.offline_queue import GET
from bridge.bitrix24.pages import ConfirmedPage
from bridge.core.errors import NotConfirmed, UpstreamError
from bridge.core.source import PassReport
from tests.bitrix24.inprocess import EXCHANGE, MakeRig, cleared_ids, ids_in
from tests.harness import until
from tests.waiting import holds


async def test_a_page_is_cleared_only_with_what_the_publisher_confirmed(rigs: MakeRig) -> None:
    rig = await rigs()
    await rig.add(range(10))
    rig.publisher.refuse(ids_in("3", "7"), "nack")
    with pytest.raises(NotConfirmed):
        await rig.queue.run_pass(full_check=False)
    confirmed = {m.key for m in rig.publisher.stored}
    assert len(confirmed) == 8
    assert sorted(cleared_ids(rig)) == sorted(confirmed)
    assert await rig.reserved_ids() == ["3", "7"]  # still reserved, nothing else is left
    assert (await rig.portal_queue())["free"] == 0
    (entry,) = await rig.state.journal_entries(rig.member_id, "")
    assert entry.confirmed == confirmed  # remembered before the clear

    rig.publisher.heal()  # the broker takes them now: the next pass re-reads the reservation
    report = await rig.queue.run_pass(full_check=False)
    assert report.published == 2
    assert Counter(rig.stored_ids()) == Counter(str(n) for n in range(10))
    assert await rig.portal_queue() == {"free": 0, "reserved": {}, "errors": 0}
    assert await rig.state.journal_entries(rig.member_id, "") == []


async def test_a_broker_that_is_down_clears_nothing_and_loses_nothing(rigs: MakeRig) -> None:
    rig = await rigs()
    await rig.add(range(120))
    rig.publisher.down = True
    with pytest.raises(NotConfirmed):
        await rig.queue.run_pass(full_check=False)
    assert cleared_ids(rig) == []
    queue = await rig.portal_queue()
    assert queue["free"] + sum(queue["reserved"].values()) == 120
    rig.publisher.heal()
    await rig.queue.run_pass(full_check=True)
    assert sorted(rig.stored_ids(), key=int) == [str(n) for n in range(120)]
    assert await rig.portal_queue() == {"free": 0, "reserved": {}, "errors": 0}


async def test_a_failed_clear_is_retried_as_a_clear_without_publishing_again(
    rigs: MakeRig,
) -> None:
    rig = await rigs()
    await rig.add(range(30))
    clear_fails = {"event.offline.clear": {"error": "INTERNAL_SERVER_ERROR", "persistent": True}}
    await rig.control.post("/_emulator/faults", json={"fail_with": clear_fails})
    with pytest.raises(UpstreamError):
        await rig.queue.run_pass(full_check=False)
    assert rig.publisher.calls == 1
    (entry,) = await rig.state.journal_entries(rig.member_id, "")
    assert len(entry.confirmed) == 30  # the journal knows they are in the broker

    await rig.control.post("/_emulator/faults", json={"clear": True})
    report = await rig.queue.run_pass(full_check=False)
    assert report.published == 0
    assert report.cleared == 30
    assert len(rig.publisher.stored) == 30  # one copy each: the retry only cleared
    assert await rig.portal_queue() == {"free": 0, "reserved": {}, "errors": 0}
    assert await rig.state.journal_entries(rig.member_id, "") == []


async def test_the_batch_carries_the_connector_and_drains_only_its_queue(rigs: MakeRig) -> None:
    rig = await rigs(connector="crm")
    await rig.add(range(60), connector="crm")
    await rig.add(range(100, 105))  # another integration's queue: not ours
    await rig.queue.run_pass(full_check=True)
    assert sorted(rig.stored_ids(), key=int) == [str(n) for n in range(60)]
    assert await rig.portal_queue("crm") == {"free": 0, "reserved": {}, "errors": 0}
    assert (await rig.portal_queue(""))["free"] == 5
    batches = [body for method, body in rig.tap.requests if method == "batch"]
    assert batches
    # Bitrix24 reads auth_connector from the request only, never from inside a command.
    assert all(body.get("auth_connector") == "crm" for body in batches)
    assert not any("auth_connector" in str(body["cmd"]) for body in batches)


async def test_cancelled_while_waiting_for_budget_keeps_the_pages_to_clear(
    rigs: MakeRig,
) -> None:
    rig = await rigs()
    pacer = rig.queue.client.pacer
    far = time.monotonic() + 3600
    pacer.budget(GET).banned_until = far
    pacer.budget("batch").banned_until = far  # not even a clear can go out
    page = ConfirmedPage("p" * 32, ("m" * 32,), ("ONCRMLEADADD",), done=True)
    to_clear = [page]
    before = rig.queue.progress_at
    waiting = asyncio.create_task(rig.queue._reserve_batch(to_clear, PassReport()))
    # Waiting for the budget is planned, not a stall: it is heard as progress.
    await until(holds(lambda: rig.queue.progress_at > before), "the wait for the budget")
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert to_clear == [page], "confirmed pages to clear were forgotten"


async def test_a_spent_budget_is_waited_out_then_the_pass_goes_on(rigs: MakeRig) -> None:
    rig = await rigs()
    await rig.add(range(10))
    rig.queue.client.pacer.budget(GET).banned_until = time.monotonic() + 0.2
    report = await rig.queue.run_pass(full_check=False)
    assert report.published == 10
    assert rig.queue.client.pacer.budget(GET).banned_until == 0.0  # an answer lifted the ban
    assert await rig.portal_queue() == {"free": 0, "reserved": {}, "errors": 0}


async def test_a_tight_list_budget_never_keeps_reservations_from_progress(rigs: MakeRig) -> None:
    rig = await rigs()
    rig.queue.client.pacer.budget("event.offline.list").banned_until = time.monotonic() + 3600
    await rig.add(range(80))
    report = await rig.queue.run_pass(full_check=True)
    assert report.published == 80
    assert rig.queue.orphans.suspected  # still owed, for a later pass
    assert rig.tap.commands("event.offline.list") == []
    assert len(rig.publisher.by_exchange(EXCHANGE)) == 80
