"""The stored cursor and where the next read resumes, ties at page boundaries included."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.diadoc.cursor import Cursor, Page


def raw(event_id: str, key: str, ticks: int = 1) -> dict[str, Any]:
    return {
        "EventId": event_id,
        "IndexKey": key,
        "Timestamp": {"Ticks": ticks},
        "DocumentId": {"MessageId": "m", "EntityId": event_id},
    }


def page(keys: str, *, limit: int) -> Page:
    """A page whose events carry the IndexKeys named by the letters of ``keys``."""
    return Page.of([raw(f"e{i}", k, ticks=ord(k)) for i, k in enumerate(keys)], limit=limit)


def test_a_page_short_of_its_limit_resumes_after_its_last_key() -> None:
    assert page("abcc", limit=5).resume() == "c"
    assert page("abcc", limit=5).rereads() == frozenset()


def test_a_cut_page_resumes_before_its_final_tie_group() -> None:
    cut = page("abbcc", limit=5)  # the tie "c" may go on beyond the page
    assert cut.full
    assert cut.resume() == "b"
    assert cut.rereads() == {"e3:e3", "e4:e4"}
    assert cut.ticks_at("b") == ord("b")
    assert page("abcde", limit=5).resume() == "d"


def test_one_tie_filling_the_page_gives_no_resume_point() -> None:
    assert page("ccccc", limit=5).resume() is None
    assert page("", limit=5).resume() is None
    assert page("", limit=5).empty


def test_the_head_of_a_page_is_its_first_tie_group_whole() -> None:
    events = [raw(f"t{i}", "t") for i in range(3)] + [{"IndexKey": "t"}, raw("x", "x")]
    head = Page.of(events, limit=100).head()
    assert [e.event_id for e in head.events] == ["t0", "t1", "t2"]
    assert len(head.rejects) == 1
    assert not head.full
    assert head.resume() == "t"  # the group is complete: the next read goes on after it


def test_malformed_events_are_set_aside_but_keep_their_place() -> None:
    events = [raw("e0", "a"), {"IndexKey": "b", "Timestamp": "never"}, ["x"], raw("e3", "c")]
    parsed = Page.of(events, limit=4)
    assert [e.event_id for e in parsed.events] == ["e0", "e3"]
    assert [r.index_key for r in parsed.rejects] == ["b", None]
    assert parsed.keys == ("a", "b", "c")
    assert parsed.full
    assert parsed.resume() == "b"  # the malformed event's key counts as a place in the feed


@pytest.mark.parametrize(
    "cursor",
    [
        Cursor(after=None, ticks=5),
        Cursor(after="k", ticks=7, checked_at=12.5, origin=3),
    ],
)
def test_cursor_round_trip(cursor: Cursor) -> None:
    assert Cursor.loads(cursor.dumps()) == cursor


def test_a_cursor_stored_before_origins_existed_loads() -> None:
    old = Cursor.loads('{"after": "k", "ticks": 7, "checked_at": null}')
    assert old == Cursor(after="k", ticks=7)
