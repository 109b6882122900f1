"""Reading REST parameters the lenient way PHP does, and refusing what Bitrix24 refuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.emulators.bitrix24.errors import argument
from bridge.emulators.bitrix24.model import Call

_TRUE = {"1", "y", "yes", "true", "on"}
_FALSE = {"0", "n", "no", "false", "off", ""}


def flag(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    try:
        return float(text) != 0
    except ValueError:
        raise argument(f"{value!r} is not a flag") from None


def integer(value: Any, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool | Mapping | list):
        raise argument(f"{name} must be an integer")
    try:
        return int(str(value).strip())
    except ValueError:
        raise argument(f"{name} must be an integer") from None


def text(value: Any) -> str:
    if value is None or isinstance(value, Mapping | list):
        return ""
    return str(value).strip()


def items(value: Any) -> list[Any]:
    """A PHP array's values; a scalar counts as one item, empty as none."""
    if value is None or value == "":
        return []
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, list):
        return value
    return [value]


def required(call: Call, name: str) -> str:
    value = text(call.params.get(name))
    if not value:
        raise argument(f"Argument '{name}' is null or empty", name)
    return value


def present(call: Call, name: str) -> str | None:
    """PHP's ``isset(...) ? trim(...) : null``: an empty string is present, and stays empty."""
    value = call.params.get(name)
    if value is None:
        return None
    if isinstance(value, Mapping | list):
        raise argument(f"{name} must be a string", name.lower())
    return str(value).strip()
