"""``event.offline.get/clear/error/list``, after ``rest/lib/api/event.php``.

The queue is the one of the request's ``auth_connector`` (``call.connector``), never of a
parameter of the method. A ``process_id`` that is given but empty is taken at its word, as the
module's SQL does: it names the unreserved rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from bridge.emulators.bitrix24 import params
from bridge.emulators.bitrix24.errors import RestError, argument
from bridge.emulators.bitrix24.model import Call, Outcome
from bridge.emulators.bitrix24.query import (
    BY_ID,
    BY_TIME,
    GET_FIELDS,
    LIST_FIELDS,
    parse_filter,
    parse_order,
)
from bridge.emulators.bitrix24.queue import new_process_id

LIST_PAGE = 50
MESSAGE_ID_LENGTH = 32


def _offset(call: Call) -> timedelta:
    return timedelta(minutes=call.portal.config.utc_offset_minutes)


def offline_get(call: Call) -> Outcome:
    p, portal = call.params, call.portal
    connector = call.connector
    clear = params.flag(p.get("CLEAR"), default=True)
    if not clear and not portal.config.offline_extended:
        raise RestError("WRONG_LICENSE", "clear=0 needs the rest_offline_extended feature")
    error = params.flag(p.get("ERROR"), default=False)
    limit = params.integer(p.get("LIMIT"), "limit", 50)
    if limit <= 0:
        raise argument("Value must be positive integer", "LIMIT")
    flt = parse_filter(p.get("FILTER"), GET_FIELDS, _offset(call))
    order = parse_order(p.get("ORDER"), GET_FIELDS, BY_TIME)
    process_id = params.present(call, "PROCESS_ID")

    queue = portal.store.queue(connector)
    rows = queue.select(flt, order, limit, error=error, process_id=process_id)
    events = [row.as_event(portal.store.zone) for row in rows]
    portal.delivered += len(rows)
    if process_id is None:
        # Rows are stamped first and deleted afterwards, as the server does it in two steps.
        process_id = new_process_id()
        queue.reserve(rows, process_id)
        if clear:
            portal.cleared += queue.delete(rows)
        answer_id: str | None = None if clear else process_id
        reserved = bool(rows) and not clear
    else:
        answer_id = process_id
        reserved = False
        if clear and rows:
            # Every row of the process goes, not only the `limit` returned.
            portal.cleared += queue.delete(queue.of_process(process_id))
    return Outcome({"process_id": answer_id, "events": events}, rows=len(rows), reserved=reserved)


_NOT_MESSAGE_IDS = "Value must be array of MESSAGE_ID values"


def _array(value: object, description: str, name: str) -> list[Any]:
    if not isinstance(value, Mapping | list):
        raise argument(description, name)
    return list(value.values()) if isinstance(value, Mapping) else value


def _message_ids(value: object) -> set[str]:
    found = set()
    for item in _array(value, _NOT_MESSAGE_IDS, "message_id"):
        text = item.strip() if isinstance(item, str) else ""
        if len(text) != MESSAGE_ID_LENGTH:
            raise argument(_NOT_MESSAGE_IDS, "messsage_id")  # sic: the module's spelling
        found.add(text)
    return found


def _ids(value: object) -> set[int]:
    found = set()
    for item in _array(value, "Value must be array of integers", "id"):
        number = params.integer(item, "id", 0) if not isinstance(item, Mapping | list) else 0
        if number <= 0:
            raise argument("Value must be array of integers", "id")
        found.add(number)
    return found


def _process_id(call: Call) -> str:
    process_id = params.present(call, "PROCESS_ID")
    if process_id is None:
        raise argument("Argument 'PROCESS_ID' is null or empty", "PROCESS_ID")
    return process_id


def offline_clear(call: Call) -> Outcome:
    p = call.params
    process_id = _process_id(call)
    queue = call.portal.store.queue(call.connector)
    rows = queue.of_process(process_id)
    # A message_id array wins over id; an empty one clears the whole process, as no list does.
    if p.get("MESSAGE_ID") is not None:
        wanted = _message_ids(p["MESSAGE_ID"])
        rows = [row for row in rows if row.message_id in wanted] if wanted else rows
    elif p.get("ID") is not None:
        ids = _ids(p["ID"])
        rows = [row for row in rows if row.id in ids] if ids else rows
    call.portal.cleared += queue.delete(rows)
    return Outcome(True)


def offline_error(call: Call) -> Outcome:
    process_id = _process_id(call)
    items = _array(call.params.get("MESSAGE_ID"), _NOT_MESSAGE_IDS, "message_id")
    wanted = {str(item).strip() for item in items if not isinstance(item, Mapping | list)}
    if wanted:
        call.portal.store.queue(call.connector).mark_error(process_id, wanted)
    return Outcome(True)


def offline_list(call: Call) -> Outcome:
    p, portal = call.params, call.portal
    connector = call.connector
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
