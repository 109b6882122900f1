"""Bitrix's ``Main\\Web\\Json::encode`` with its default options, byte for byte.

The offline queue's ``MESSAGE_ID`` is ``md5(EVENT_NAME . '|' . Json::encode(EVENT_DATA))``
(``rest/lib/eventoffline.php``, ``getMessageId``), so a client that predicts or checks a
``MESSAGE_ID`` needs the same bytes. The default options are ``JSON_HEX_TAG | JSON_HEX_AMP |
JSON_HEX_APOS | JSON_HEX_QUOT | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE``
(``main/lib/web/json.php``): ``<>&'"`` inside strings become ``\\u003C``-style escapes, ``/``
becomes ``\\/``, other text stays as UTF-8 except U+2028 and U+2029.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from bridge.emulators.bitrix24.phpform import php_array

__all__ = ["encode", "message_id", "php_value"]

_STRING = json.encoder.encode_basestring


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} cannot be JSON-encoded")


# One C encoder made once: JSONEncoder.encode builds a new one per call, the most of its cost.
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
if _C_ENCODER is not None:
    _chunks = _C_ENCODER(None, _refuse, _STRING, None, ":", ",", False, False, False)

    def _compact(value: Any) -> str:
        return "".join(_chunks(value, 0))

else:  # pragma: no cover - CPython always has it

    def _compact(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# What Python's string encoder leaves raw but PHP escapes.
_RAW = str.maketrans(
    {
        "/": "\\/",
        "<": "\\u003C",
        ">": "\\u003E",
        "&": "\\u0026",
        "'": "\\u0027",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)
# Escape pairs, matched left to right: an escaped backslash never starts an escaped quote.
_ESCAPE = re.compile(r"\\.")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SPECIAL = re.compile("[/<>&'\u2028\u2029\ud800-\udfff]|\\\\\"")


def php_value(value: Any) -> Any:
    """The value as PHP holds it: a mapping with keys ``0..n-1`` is a list, every key a string."""
    if isinstance(value, Mapping):
        return php_array({str(key): php_value(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return [php_value(item) for item in value]
    return value


def encode(value: Any) -> str:
    """``Json::encode(value)`` for a value already in PHP's shape (see :func:`php_value`)."""
    if _has_float(value):
        return _encode(value)
    # Python's own encoder writes the same bytes but for characters only strings can hold.
    return _escaped(_compact(value))


def _has_float(value: Any) -> bool:
    kind = type(value)
    if kind is dict:
        return any(_has_float(item) for item in value.values())
    if kind is list:
        return any(_has_float(item) for item in value)
    return kind is float


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return _string(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else ("true" if value else "false")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Mapping):
        if not value:
            return "[]"  # an empty PHP array
        inner = ",".join(f"{_string(str(k))}:{_encode(v)}" for k, v in value.items())
        return "{" + inner + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    raise TypeError(f"{type(value).__name__} cannot be JSON-encoded")


def _string(text: str) -> str:
    quoted: str = _STRING(text)
    return _escaped(quoted)


def _escaped(text: str) -> str:
    """PHP's escapes for what Python's encoder wrote (inside strings: nothing else changes)."""
    if _SPECIAL.search(text) is None:
        return text
    text = text.translate(_RAW)
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)  # JSON_INVALID_UTF8_SUBSTITUTE
    if '\\"' not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\u0022" if m.group() == '\\"' else m.group(), text)


def _float(number: float) -> str:
    """PHP's shortest round-trip form: ``1`` for 1.0, ``1.0e+17`` from 17 integer digits on."""
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("Inf and NaN cannot be JSON-encoded")
    mantissa, _, exponent = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip("0")
    sign = "-" if str(number).startswith("-") else ""
    if not digits:
        return sign + "0"
    if point < -3 or point > 17:
        rest = digits[1:] or "0"
        power = point - 1
        return f"{sign}{digits[0]}.{rest}e{'+' if power >= 0 else '-'}{abs(power)}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if len(digits) <= point:
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def message_id(event_name: str, data: Any) -> str:
    serialized = event_name + "|" + encode(data)
    return hashlib.md5(serialized.encode(), usedforsecurity=False).hexdigest()
