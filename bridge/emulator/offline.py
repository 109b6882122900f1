"""``event.offline.get/clear/error/list``."""

from __future__ import annotations

from datetime import timedelta

from bridge.emulator import params
from bridge.emulator.errors import RestError, argument
from bridge.emulator.model import Call, Outcome
from bridge.emulator.query import BY_ID, BY_TIME, GET_FIELDS, LIST_FIELDS, parse_filter, parse_order
from bridge.emulator.queue import new_process_id

LIST_PAGE = 50
MESSAGE_ID_LENGTH = 32


def _offset(call: Call) -> timedelta:
    return timedelta(minutes=call.portal.config.utc_offset_minutes)


def offline_get(call: Call) -> Outcome:
    p, portal = call.params, call.portal
    connector = params.connector(call)
    clear = params.flag(p.get("CLEAR"), default=True)
    if not clear and not portal.config.offline_extended:
        raise RestError("WRONG_LICENSE", "clear=0 needs the rest_offline_extended feature")
    error = params.flag(p.get("ERROR"), default=False)
    limit = params.integer(p.get("LIMIT"), "limit", 50)
    if limit <= 0:
        raise argument("limit must be greater than 0")
    flt = parse_filter(p.get("FILTER"), GET_FIELDS, _offset(call))
    order = parse_order(p.get("ORDER"), GET_FIELDS, BY_TIME)
    process_id = params.text(p.get("PROCESS_ID")) or None

    queue = portal.store.queue(connector)
    rows = queue.select(flt, order, limit, error=error, process_id=process_id)
    events = [row.as_event(portal.store.zone) for row in rows]
    if process_id is None:
        # Rows are stamped first and deleted afterwards, as the server does it in two steps.
        process_id = new_process_id()
        queue.reserve(rows, process_id)
        if clear:
            queue.delete(rows)
        answer_id: str | None = None if clear else process_id
        reserved = bool(rows) and not clear
    else:
        answer_id = process_id
        reserved = False
        if clear:
            # Every row of the process goes, not only the `limit` returned.
            queue.delete(queue.of_process(process_id))
    return Outcome({"process_id": answer_id, "events": events}, rows=len(rows), reserved=reserved)


def _message_ids(value: object) -> set[str]:
    found = set()
    for item in params.items(value):
        if not isinstance(item, str) or len(item) != MESSAGE_ID_LENGTH:
            raise argument("message_id must be a list of 32-character strings")
        found.add(item)
    return found


def _ids(value: object) -> set[int]:
    found = set()
    for item in params.items(value):
        number = params.integer(item, "id", 0)
        if number <= 0:
            raise argument("id must be a list of positive integers")
        found.add(number)
    return found


def offline_clear(call: Call) -> Outcome:
    p = call.params
    connector = params.connector(call)
    process_id = params.required(call, "PROCESS_ID")
    queue = call.portal.store.queue(connector)
    rows = queue.of_process(process_id)
    # PHP's empty(): an empty list is the same as no list, and clears the whole process.
    if params.items(p.get("MESSAGE_ID")):
        wanted = _message_ids(p.get("MESSAGE_ID"))
        rows = [row for row in rows if row.message_id in wanted]
    elif params.items(p.get("ID")):
        ids = _ids(p.get("ID"))
        rows = [row for row in rows if row.id in ids]
    queue.delete(rows)
    return Outcome(True)


def offline_error(call: Call) -> Outcome:
    connector = params.connector(call)
    process_id = params.required(call, "PROCESS_ID")
    wanted = _message_ids(call.params.get("MESSAGE_ID"))
    if wanted:
        call.portal.store.queue(connector).mark_error(process_id, wanted)
    return Outcome(True)


def offline_list(call: Call) -> Outcome:
    p, portal = call.params, call.portal
    connector = params.connector(call)
    flt = parse_filter(p.get("FILTER"), LIST_FIELDS, _offset(call))
    order = parse_order(p.get("ORDER"), LIST_FIELDS, BY_ID)
    start = max(0, params.integer(p.get("START"), "start", 0))
    rows = portal.store.queue(connector).listing(flt, order)
    page = rows[start : start + LIST_PAGE]
    following = start + LIST_PAGE
    return Outcome(
        [row.as_listed(portal.store.zone) for row in page],
        total=len(rows),
        next=following if following < len(rows) else None,
        rows=len(page),
    )
