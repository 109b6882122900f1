"""Parking, in process (``tests/bitrix24/inprocess.py``): an event the broker keeps refusing, or
a malformed row, is parked with ``event.offline.error`` after ``poison_attempts`` tries and the
rest flows on; timeouts and lost connections never count; ``replay`` drains parked rows again.
The same end to end, through the webhook and a real broker: ``test_poison_rabbitmq.py``.
"""

from __future__ import annotations

import json

import pytest

from bridge.amqp.protocol import FailureReason
from bridge.core.errors import NotConfirmed
from tests.bitrix24.inprocess import MakeRig, break_row, ids_in

EMPTY = {"free": 0, "reserved": {}, "errors": 0}


async def test_an_event_refused_n_times_is_parked_and_the_rest_flow(rigs: MakeRig) -> None:
    rig = await rigs(poison_attempts=3)
    await rig.add(range(10))
    rig.publisher.refuse(ids_in("4"), "nack")  # for ever
    for _attempt in range(2):
        with pytest.raises(NotConfirmed):
            await rig.queue.run_pass(full_check=False)
        assert await rig.reserved_ids() == ["4"]
        assert rig.tap.commands("event.offline.error") == []
    report = await rig.queue.run_pass(full_check=False)  # the third refusal parks it
    assert report.parked == 1
    assert len(rig.tap.commands("event.offline.error")) == 1
    assert await rig.portal_queue() == {"free": 0, "reserved": {}, "errors": 1}
    assert sorted(rig.stored_ids(), key=int) == [str(n) for n in range(10) if n != 4]
    assert await rig.state.journal_entries(rig.member_id, "") == []
    parked = rig.metrics.registry.get_sample_value(
        "bitrix24_bridge_events_parked_total", {"event": "ONCRMLEADADD", "reason": "nack"}
    )
    assert parked == 1


@pytest.mark.parametrize("reason", ["timeout", "connection"])
async def test_the_brokers_own_trouble_never_parks_an_event(
    rigs: MakeRig, reason: FailureReason
) -> None:
    rig = await rigs(poison_attempts=2)
    await rig.add(range(3))
    rig.publisher.refuse(ids_in("1"), reason, times=5)  # more than twice the attempts
    for _attempt in range(5):
        with pytest.raises(NotConfirmed):
            await rig.queue.run_pass(full_check=False)
    assert rig.tap.commands("event.offline.error") == []
    await rig.queue.run_pass(full_check=False)  # the broker takes it now
    assert sorted(rig.stored_ids()) == ["0", "1", "2"]
    assert await rig.portal_queue() == EMPTY


async def test_parked_rows_are_replayed_once_the_cause_is_gone(rigs: MakeRig) -> None:
    rig = await rigs(poison_attempts=1)
    await rig.add(range(5))
    rig.publisher.refuse(ids_in("1", "3"), "returned")
    assert (await rig.queue.run_pass(full_check=False)).parked == 2
    assert await rig.portal_queue() == {"free": 0, "reserved": {}, "errors": 2}

    rig.publisher.heal()
    rig.queue.replay_requested = True
    report = await rig.queue.run_pass(full_check=False)
    assert report.published == 2
    assert sorted(rig.stored_ids()) == ["0", "1", "2", "3", "4"]
    assert await rig.portal_queue() == EMPTY
    assert await rig.state.journal_entries(rig.member_id, "") == []
    replayed = [params for params in rig.tap.commands("event.offline.get") if params.get("error")]
    assert replayed, "the parked rows were not read with error=1"


async def test_a_malformed_row_is_never_published_and_is_parked_after_its_attempts(
    rigs: MakeRig,
) -> None:
    rig = await rigs(poison_attempts=2)
    await rig.add(range(5))
    rig.tap.rewrite = break_row("2", "EVENT_NAME")  # damaged on every read, recovery included
    with pytest.raises(NotConfirmed):
        await rig.queue.run_pass(full_check=False)  # attempt 1; the four others go through
    assert sorted(rig.stored_ids()) == ["0", "1", "3", "4"]
    report = await rig.queue.run_pass(full_check=False)  # attempt 2: parked
    assert report.parked == 1
    assert "2" not in rig.stored_ids()
    assert await rig.portal_queue() == {"free": 0, "reserved": {}, "errors": 1}
    parked = rig.metrics.registry.get_sample_value(
        "bitrix24_bridge_events_parked_total", {"event": "unknown", "reason": "malformed"}
    )
    assert parked == 1


async def test_a_malformed_row_without_a_message_id_is_kept_in_the_state(rigs: MakeRig) -> None:
    rig = await rigs(poison_attempts=1)
    await rig.add(range(3))
    rig.tap.rewrite = break_row("1", "MESSAGE_ID")
    report = await rig.queue.run_pass(full_check=False)
    assert report.parked == 1
    assert sorted(rig.stored_ids()) == ["0", "2"]
    (record,) = await rig.state.parked()
    assert record.reason == "malformed"
    assert json.loads(record.payload)["EVENT_DATA"]["FIELDS"]["ID"] == "1"
    # The portal cannot park it: it stays reserved there, and nothing else does.
    assert await rig.reserved_ids() == ["1"]
