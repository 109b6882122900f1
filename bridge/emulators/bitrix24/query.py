"""``filter`` and ``order`` parameters of the offline methods, as Bitrix24's ORM reads them."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from bridge.emulators.bitrix24.errors import argument

if TYPE_CHECKING:
    from bridge.emulators.bitrix24.queue import Row

GET_FIELDS = frozenset({"ID", "TIMESTAMP_X", "EVENT_NAME", "MESSAGE_ID"})
LIST_FIELDS = GET_FIELDS | {"PROCESS_ID", "ERROR"}
# Longest first, so ">=" is not read as ">".
_OPERATORS = (">=", "<=", "=", ">", "<", "@", "%")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}


def _field_value(row: Row, field: str) -> Any:
    if field == "ID":
        return row.id
    if field == "TIMESTAMP_X":
        return row.timestamp
    if field == "EVENT_NAME":
        return row.event_name.upper()
    if field == "MESSAGE_ID":
        return row.message_id.lower()
    if field == "PROCESS_ID":
        return row.process_id.lower()
    return int(row.error)


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    value: Any

    def matches(self, row: Row) -> bool:
        actual = _field_value(row, self.field)
        if self.op == "@":
            return bool(actual in self.value)
        if self.op == "%":
            return str(self.value) in str(actual)
        return _COMPARE[self.op](actual, self.value)


@dataclass(frozen=True, slots=True)
class Filter:
    conditions: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def matches(self, row: Row) -> bool:
        return all(condition.matches(row) for condition in self.conditions)


def parse_filter(raw: Any, fields: frozenset[str], utc_offset: timedelta) -> Filter:
    if raw in (None, "", [], {}):
        return Filter()
    if not isinstance(raw, Mapping):
        raise argument("filter must be an object")
    conditions = []
    for key, value in raw.items():
        key = str(key)
        if key.startswith("!"):
            raise argument("Negation is not supported in filter")
        op = next((prefix for prefix in _OPERATORS if key.startswith(prefix)), "=")
        field = (key[len(op) :] if key.startswith(op) else key).strip().upper()
        if field not in fields:
            raise argument(f"Unknown filter field {field!r}")
        conditions.append(Condition(field, op, _convert(field, op, value, utc_offset)))
    return Filter(tuple(conditions))


def _convert(field: str, op: str, value: Any, utc_offset: timedelta) -> Any:
    if op == "@":
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, Mapping):
            items = list(items.values())
        if not isinstance(items, list):
            raise argument(f"{field}: '@' needs a list")
        return frozenset(_scalar(field, item, utc_offset) for item in items)
    if op == "%":
        if isinstance(value, Mapping | list):
            raise argument(f"{field}: '%' needs a string")
        return str(value).upper() if field == "EVENT_NAME" else str(value).lower()
    return _scalar(field, value, utc_offset)


def _scalar(field: str, value: Any, utc_offset: timedelta) -> Any:
    if isinstance(value, Mapping | list):
        raise argument(f"{field}: a scalar value is expected")
    text = str(value).strip()
    if field in ("ID", "ERROR"):
        if text in ("Y", "N") and field == "ERROR":
            return int(text == "Y")
        try:
            return int(text)
        except ValueError:
            raise argument(f"{field}: {text!r} is not an integer") from None
    if field == "TIMESTAMP_X":
        return parse_timestamp(text, utc_offset)
    return text.upper() if field == "EVENT_NAME" else text.lower()


def parse_timestamp(text: str, utc_offset: timedelta) -> int:
    """ISO 8601 or Bitrix24's ``DD.MM.YYYY HH:MI:SS``; no offset means the portal's time zone."""
    moment: datetime | None = None
    for parse in (datetime.fromisoformat, _bitrix_date):
        try:
            moment = parse(text)
            break
        except ValueError:
            continue
    if moment is None:
        raise argument(f"TIMESTAMP_X: {text!r} is not a date")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone(utc_offset))
    return int(moment.timestamp())


def _bitrix_date(text: str) -> datetime:
    for pattern in ("%d.%m.%Y %H:%M:%S", "%d.%m.%Y"):
        try:
            return datetime.strptime(text, pattern)  # the caller adds the zone
        except ValueError:
            continue
    raise ValueError(text)


@dataclass(frozen=True, slots=True)
class Order:
    keys: tuple[tuple[str, bool], ...]  # (field, descending)

    @property
    def by_time(self) -> bool | None:
        """True/False for a plain ``TIMESTAMP_X DESC/ASC`` order, None for any other."""
        if len(self.keys) == 1 and self.keys[0][0] == "TIMESTAMP_X":
            return self.keys[0][1]
        return None

    def sort(self, rows: Iterable[Row]) -> list[Row]:
        # Ties fall back to the order rows were last written, as a table scan would meet them.
        ordered = sorted(rows, key=lambda row: row.seq)
        for field, descending in reversed(self.keys):
            ordered.sort(key=_sort_key(field), reverse=descending)
        return ordered


def _sort_key(field: str) -> Callable[[Row], Any]:
    return lambda row: _field_value(row, field)


def parse_order(raw: Any, fields: frozenset[str], default: Order) -> Order:
    if raw in (None, "", [], {}):
        return default
    if not isinstance(raw, Mapping):
        raise argument("order must be an object")
    keys = []
    for field, direction in raw.items():
        name = str(field).strip().upper()
        way = str(direction).strip().upper()
        if name not in fields or way not in ("ASC", "DESC"):
            raise argument(f"Wrong order {field!r}: {direction!r}")
        keys.append((name, way == "DESC"))
    return Order(tuple(keys))


BY_TIME = Order((("TIMESTAMP_X", False),))
BY_ID = Order((("ID", False),))
