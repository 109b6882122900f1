"""PHP-style query strings: ``a[b][]=1`` as PHP's ``http_build_query`` and ``parse_str`` see them.

Bitrix24 parses every form body and every ``batch`` command with PHP, so both directions follow
PHP, quirks included: on decoding, dots and spaces in a top-level name become ``_``, the last of
repeated plain keys wins, and an array whose keys are exactly ``0..n-1`` in order comes out as a
``list`` (that is what PHP's ``json_encode`` would make of it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote_plus

__all__ = ["decode", "encode", "php_array"]

# PHP turns a numeric string key into an integer key only in its canonical form.
_INT_KEY = re.compile(r"-?(0|[1-9][0-9]{0,18})")
_ARRAY_SEGMENT = object()


def encode(params: Mapping[str, Any]) -> str:
    """``http_build_query``: nested mappings and sequences become ``a[b][0]=x``; None is omitted."""
    pairs: list[str] = []
    for key, value in params.items():
        _encode_value(str(key), value, pairs)
    return "&".join(pairs)


def _encode_value(name: str, value: Any, pairs: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _encode_value(f"{name}[{key}]", item, pairs)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _encode_value(f"{name}[{index}]", item, pairs)
        return
    text = ("1" if value else "0") if isinstance(value, bool) else str(value)
    pairs.append(f"{quote(name, safe='[]')}={quote(text, safe='')}")


class _PhpArray:
    """An ordered PHP array: int and str keys, plus the next index ``[]`` appends at."""

    __slots__ = ("items", "next_index")

    def __init__(self) -> None:
        self.items: dict[int | str, Any] = {}
        self.next_index = 0

    def set(self, key: int | str | None, value: Any) -> None:
        if key is None:
            key = self.next_index
        if isinstance(key, int) and key >= self.next_index:
            self.next_index = key + 1
        self.items[key] = value

    def child(self, key: int | str | None) -> _PhpArray:
        """The array at ``key``, replacing a scalar there (PHP overwrites it)."""
        if key is not None:
            existing = self.items.get(key)
            if isinstance(existing, _PhpArray):
                return existing
        created = _PhpArray()
        self.set(key, created)
        return created


def decode(query: str | bytes, *, max_depth: int = 16, max_keys: int = 1000) -> dict[str, Any]:
    """``parse_str``: the reverse of :func:`encode`. Raises ``ValueError`` on hostile input."""
    if isinstance(query, bytes):
        query = query.decode("utf-8")  # UnicodeDecodeError is a ValueError
    # Counted before any work, so an oversized body costs one split, not a parse.
    pairs = [pair for pair in query.split("&") if pair]
    if len(pairs) > max_keys:
        raise ValueError(f"more than {max_keys} keys")
    root = _PhpArray()
    for pair in pairs:
        raw_name, _, raw_value = pair.partition("=")
        name = _unquote(raw_name)
        value = _unquote(raw_value)
        path = _parse_name(name, max_depth)
        if path is not None:
            _assign(root, path, value)
    result = _plain(root)
    return result if isinstance(result, dict) else {str(i): v for i, v in enumerate(result)}


def _unquote(text: str) -> str:
    # Most names and many values need no decoding; unquote_plus is the costly part of a parse.
    if "%" not in text and "+" not in text:
        return text
    return unquote_plus(text)


def _parse_name(name: str, max_depth: int) -> list[Any] | None:
    """The path of keys a variable name sets, or None when PHP would ignore the variable."""
    name = name.lstrip(" ")
    if "\x00" in name:
        raise ValueError("NUL in a key")
    open_at = name.find("[")
    if open_at > 0 and name.find("]", open_at) < 0:
        # An unmatched first bracket is not an array: PHP keeps it as part of the name.
        open_at = -1
        base = name.replace("[", "_", 1)
    else:
        base = name if open_at < 0 else name[:open_at]
    base = base.replace(".", "_").replace(" ", "_")
    if not base:
        return None
    path: list[Any] = [base]
    rest = "" if open_at < 0 else name[open_at:]
    while rest.startswith("["):
        close_at = rest.find("]")
        if close_at < 0:
            break  # PHP drops a trailing unterminated segment
        segment = rest[1:close_at]
        path.append(_ARRAY_SEGMENT if segment == "" else _php_key(segment))
        if len(path) - 1 > max_depth:
            raise ValueError(f"key nested deeper than {max_depth}")
        rest = rest[close_at + 1 :]
    return path


def _php_key(segment: str) -> int | str:
    if _INT_KEY.fullmatch(segment):
        number = int(segment)
        if -(2**63) <= number < 2**63:
            return number
    return segment


def _assign(root: _PhpArray, path: list[Any], value: str) -> None:
    target = root
    for segment in path[:-1]:
        target = target.child(None if segment is _ARRAY_SEGMENT else segment)
    last = path[-1]
    target.set(None if last is _ARRAY_SEGMENT else last, value)


def _plain(array: _PhpArray) -> dict[str, Any] | list[Any]:
    converted = {
        key: _plain(item) if isinstance(item, _PhpArray) else item
        for key, item in array.items.items()
    }
    return php_array(converted)


def php_array(items: Mapping[Any, Any]) -> dict[str, Any] | list[Any]:
    """What PHP's ``json_encode`` makes of an array: a list when keys are ``0..n-1`` in order."""
    keys = list(items)
    if all(_as_index(key) == position for position, key in enumerate(keys)):
        return list(items.values())
    return {str(key): item for key, item in items.items()}


def _as_index(key: int | str) -> int | None:
    if isinstance(key, int):
        return key
    if _INT_KEY.fullmatch(key):
        return int(key)
    return None
