"""Query strings the way a portal's PHP reads and writes them: ``parse_str``, ``http_build_query``.

Reading follows ``php_default_treat_data`` and ``php_register_variable_ex`` (PHP's
``main/php_variables.c``); writing follows ``php_url_encode_hash_ex`` (``ext/standard/http.c``).
The emulator keeps this module to itself on purpose: the bridge has its own decoder, and testing
one with the other would hide a mistake both share. The tests compare it with a real ``php``.

Decoded values are plain Python: every PHP array whose keys are exactly ``0..n-1`` in order becomes
a ``list`` (what ``json_encode`` would make of it), any other array a ``dict`` with ``str`` keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote_plus, unquote_to_bytes

__all__ = ["MAX_DEPTH", "MAX_VARS", "http_build_query", "parse_str", "php_array"]

MAX_DEPTH = 64  # max_input_nesting_level: a deeper variable is dropped, as PHP drops it
MAX_VARS = 10_000  # PHP stops at max_input_vars (1000, raised on portals); more is hostile
# zend_handle_numeric_str: only the canonical spelling of a 64-bit integer becomes an int key.
_NUMERIC = re.compile(rb"-?[1-9][0-9]{0,18}|0")
_LONG_MAX = 2**63 - 1


def _key(raw: bytes) -> int | bytes:
    if _NUMERIC.fullmatch(raw):
        number = int(raw)
        if -_LONG_MAX - 1 <= number <= _LONG_MAX:
            return number
    return raw


class _Array:
    """A PHP array: ordered keys (int or bytes) and the next index ``[]`` appends at."""

    __slots__ = ("items", "next_index")

    def __init__(self) -> None:
        self.items: dict[int | bytes, Any] = {}
        self.next_index: int | None = None  # PHP 8.2+: a first negative key moves it too

    def append(self, value: Any) -> bool:
        index = 0 if self.next_index is None else self.next_index
        if index in self.items:
            return False  # past ZEND_LONG_MAX: PHP drops the value
        self.put(index, value)
        return True

    def put(self, key: int | bytes, value: Any) -> None:
        self.items[key] = value
        if isinstance(key, int) and (self.next_index is None or key >= self.next_index):
            self.next_index = min(key + 1, _LONG_MAX)

    def child(self, key: int | bytes | None) -> _Array | None:
        """The array at ``key`` (None: a new one appended); a scalar there is replaced."""
        if key is not None:
            found = self.items.get(key)
            if isinstance(found, _Array):
                return found
        created = _Array()
        if key is None:
            return created if self.append(created) else None
        self.put(key, created)
        return created


def parse_str(query: str | bytes) -> dict[str, Any]:
    """PHP's ``parse_str``. Raises ``ValueError`` for more than :data:`MAX_VARS` variables."""
    raw = query.encode() if isinstance(query, str) else query
    root = _Array()
    pairs = [pair for pair in raw.split(b"&") if pair]  # strtok skips empty tokens
    if len(pairs) > MAX_VARS:
        raise ValueError(f"more than {MAX_VARS} variables")
    for pair in pairs:
        name, _, value = pair.partition(b"=")
        _register(root, _urldecode(name), _urldecode(value))
    plain = _plain(root)
    return plain if isinstance(plain, dict) else {str(i): v for i, v in enumerate(plain)}


def _urldecode(raw: bytes) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" ")) if b"%" in raw or b"+" in raw else raw


def _register(root: _Array, name: bytes, value: bytes) -> None:
    name = name.split(b"\0", 1)[0].lstrip(b" ")  # the name is a C string
    bracket = name.find(b"[")
    head = name if bracket < 0 else name[:bracket]
    head = head.replace(b" ", b"_").replace(b".", b"_")
    if not head:
        return
    if bracket < 0:
        root.put(_key(head), value)
        return
    target, pos = root, bracket  # pos: at a '['
    index: int | bytes | None = _key(head)
    for depth in range(1, MAX_DEPTH + 2):
        if depth > MAX_DEPTH:
            root.items.pop(_key(head), None)  # PHP deletes the whole variable, earlier parts too
            return
        start = pos + 1
        close = name.find(b"]", start)
        if close < 0:
            if depth == 1:
                # Not an index after all: '[' becomes '_', and so do ' ', '.', '[' after it.
                rest = name[start:].translate(_UNDERSCORE)
                index = _key(head + b"_" + rest)
            break
        found = target.child(index)
        if found is None:
            return
        target = found
        index = None if close == start else _key(name[start:close])
        pos = close + 1
        if name[pos : pos + 1] != b"[":
            break  # anything after the last ']' is ignored
    if index is None:
        target.append(value)
    else:
        target.put(index, value)


_UNDERSCORE = bytes.maketrans(b" .[", b"___")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _plain(array: _Array) -> dict[str, Any] | list[Any]:
    converted = {
        key if isinstance(key, int) else _text(key): (
            _plain(item) if isinstance(item, _Array) else _text(item)
        )
        for key, item in array.items.items()
    }
    return php_array(converted)


def php_array(items: Mapping[Any, Any]) -> dict[str, Any] | list[Any]:
    """What ``json_encode`` makes of a PHP array: a list when its keys are ``0..n-1`` in order."""
    if all(_index(key) == position for position, key in enumerate(items)):
        return list(items.values())
    return {str(key): item for key, item in items.items()}


def _index(key: Any) -> int | None:
    if isinstance(key, int):
        return key
    found = _key(str(key).encode())
    return found if isinstance(found, int) else None


def http_build_query(params: Mapping[str, Any]) -> str:
    """PHP's ``http_build_query``: ``a%5Bb%5D=1``, spaces as ``+``, ``None`` left out."""
    pairs: list[str] = []
    for key, value in params.items():
        _build(_urlencode(str(key)), value, pairs)
    return "&".join(pairs)


def _build(name: str, value: Any, pairs: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping | list | tuple):
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, item in items:
            _build(f"{name}%5B{_urlencode(str(key))}%5D", item, pairs)
        return
    text = ("1" if value else "0") if isinstance(value, bool) else str(value)
    pairs.append(f"{name}={_urlencode(text)}")


def _urlencode(text: str) -> str:
    # PHP's urlencode leaves only letters, digits and "-_." alone; Python also spares "~".
    return quote_plus(text, safe="").replace("~", "%7E")
