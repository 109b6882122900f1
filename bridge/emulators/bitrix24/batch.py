"""``batch``: up to 50 calls in one request, later ones referring to earlier results.

Follows ``CRestProvider::methodsBatch`` and ``CRestUtil::processBatchElement`` (``rest`` module):
commands past the 50th answer ``ERROR_BATCH_LENGTH_EXCEEDED`` one by one, a command that is not
a string is skipped, a failed command has no ``result_time`` entry, and a reference such as
``$result[get][process_id]`` walks as far as its keys exist.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bridge.emulators.bitrix24.errors import RestError, argument
from bridge.emulators.bitrix24.model import Call, Outcome, Reply
from bridge.emulators.bitrix24.phpform import parse_str, php_array

MAX_COMMANDS = 50
_REFERENCE = re.compile(r"\$(result|next|total|time|error)(\S*)", re.IGNORECASE)
_SEGMENT = re.compile(r"\[([^\]]+)\]")


def truthy(value: Any) -> bool:
    """PHP's truth: ``""``, ``"0"``, 0, empty arrays and null are false; ``"false"`` is true."""
    return value not in (None, "", "0", 0, False, [], {})


def command_methods(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The methods a batch request's ``cmd`` names, in order (for the call log)."""
    raw = next((v for k, v in params.items() if str(k).upper() == "CMD"), None)
    values = raw.values() if isinstance(raw, Mapping) else raw if isinstance(raw, list) else []
    return tuple(
        c.partition("#")[0].partition("?")[0].lower() for c in values if isinstance(c, str)
    )


def run(call: Call) -> Outcome:
    halt = truthy(call.params.get("HALT"))
    raw = call.params.get("CMD")
    # PHP's foreach over a string (or nothing) runs no command.
    commands: list[tuple[Any, Any]] = (
        list(raw.items())
        if isinstance(raw, Mapping)
        else list(enumerate(raw))
        if isinstance(raw, list)
        else []
    )
    sections: dict[str, dict[str, Any]] = {
        n: {} for n in ("result", "error", "total", "next", "time")
    }
    reserved, modelled = False, 0.0
    for position, (key, command) in enumerate(commands):
        if position >= MAX_COMMANDS:
            reply = Reply(error=RestError("ERROR_BATCH_LENGTH_EXCEEDED"))
        elif isinstance(command, str):
            reply = _run_one(call, command, sections)
        else:
            continue
        reserved = reserved or reply.reserved
        modelled += reply.modelled
        name = str(key)
        if reply.error is not None:
            sections["error"][name] = reply.error.body()
            if halt:
                break
            continue
        sections["result"][name] = reply.result
        for section, value in (("total", reply.total), ("next", reply.next), ("time", reply.time)):
            if value is not None:
                sections[section][name] = value
    answer = {
        "result" if name == "result" else f"result_{name}": php_array(section)
        for name, section in sections.items()
    }
    return Outcome(answer, reserved=reserved, modelled=modelled)


def _run_one(call: Call, command: str, sections: dict[str, dict[str, Any]]) -> Reply:
    path, _, query = command.partition("#")[0].partition("?")
    method = path.lower()
    if method == "batch":
        return Reply(error=RestError("ERROR_BATCH_METHOD_NOT_ALLOWED"))
    try:
        decoded = parse_str(query) if query else {}
    except ValueError as exc:
        return Reply(error=argument(f"Wrong query: {exc}"))
    return call.invoke(method, _substitute(decoded, sections))


def _substitute(value: Any, sections: dict[str, dict[str, Any]]) -> Any:
    if isinstance(value, dict):
        return {key: _substitute(item, sections) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, sections) for item in value]
    if not isinstance(value, str) or "$" not in value:
        return value
    text: Any = value
    for match in list(_REFERENCE.finditer(value)):
        keys = _SEGMENT.findall(match.group(2))
        if not keys:
            continue
        found = _walk(sections.get(match.group(1)), keys)
        if match.group(0) == text:
            text = found  # the whole value: any type, an array included
            break
        if isinstance(found, int | float) and not isinstance(found, bool):
            found = str(found)
        if isinstance(text, str) and isinstance(found, str):
            text = text.replace(match.group(0), found)
    return text


def _walk(current: Any, keys: list[str]) -> Any:
    """Follow ``keys`` while each is set (PHP ``isset``); stop at the first that is not."""
    for key in keys:
        if isinstance(current, Mapping) and current.get(key) is not None:
            current = current[key]
        elif isinstance(current, list | str) and _offset(key) < len(current):
            if isinstance(current, list) and current[int(key)] is None:
                break
            current = current[int(key)]
        else:
            break
    return current


def _offset(key: str) -> int:
    """A canonical non-negative integer key as an offset; anything else is out of range."""
    return int(key) if key.isdigit() and key == str(int(key)) else 1 << 62
