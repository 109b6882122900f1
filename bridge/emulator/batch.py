"""``batch``: up to 50 calls in one request, later ones referring to earlier results."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bridge import phpquery
from bridge.emulator import params
from bridge.emulator.errors import RestError, argument
from bridge.emulator.model import Call, Outcome, Reply

MAX_COMMANDS = 50
_REFERENCE = re.compile(r"\$(result|next|total|error)((?:\[[^\]\[]*\])+)")
_SEGMENT = re.compile(r"\[([^\]\[]*)\]")
_MISSING = object()


def run(call: Call) -> Outcome:
    halt = params.flag(call.params.get("HALT"), default=False)
    commands = _commands(call.params.get("CMD"))
    if len(commands) > MAX_COMMANDS:
        raise RestError(
            "ERROR_BATCH_LENGTH_EXCEEDED", f"Max batch length exceeded ({MAX_COMMANDS})"
        )
    sections: dict[str, dict[str, Any]] = {
        name: {} for name in ("result", "error", "total", "next", "time")
    }
    reserved = False
    elsewhere = 0.0
    for key, command in commands:
        reply = _run_one(call, command, sections)
        if reply.time is not None:
            sections["time"][key] = reply.time
            elsewhere += float(reply.time.get("processing", 0.0))
        reserved = reserved or reply.reserved
        if reply.error is not None:
            sections["error"][key] = reply.error.body()
            if halt:
                break
            continue
        sections["result"][key] = reply.result
        if reply.total is not None:
            sections["total"][key] = reply.total
        if reply.next is not None:
            sections["next"][key] = reply.next
    # PHP's json_encode: a key list 0..n-1 (or nothing at all) becomes a JSON list.
    answer = {
        "result" if name == "result" else f"result_{name}": phpquery.php_array(section)
        for name, section in sections.items()
    }
    return Outcome(answer, reserved=reserved, charged_elsewhere=elsewhere)


def _commands(raw: Any) -> list[tuple[str, Any]]:
    if raw is None or raw == "":
        return []
    if isinstance(raw, list):
        return [(str(index), command) for index, command in enumerate(raw)]
    if isinstance(raw, Mapping):
        return [(str(key), command) for key, command in raw.items()]
    raise argument("cmd must be a list or an object")


def _run_one(call: Call, command: Any, sections: dict[str, dict[str, Any]]) -> Reply:
    if not isinstance(command, str):
        return Reply(error=argument("A command must be a string"))
    path, _, query = command.partition("?")
    method = path.strip().lower().removesuffix(".json")
    if method == "batch":
        return Reply(error=RestError("ERROR_BATCH_METHOD_NOT_ALLOWED", "Batch call is not allowed"))
    try:
        decoded = phpquery.decode(query)
    except ValueError as exc:
        return Reply(error=argument(f"Wrong query: {exc}"))
    return call.invoke(method, _substitute(decoded, sections))


def _substitute(value: Any, sections: dict[str, dict[str, Any]]) -> Any:
    """Put earlier results in for ``$result[key][field]``-style references, after decoding."""
    if isinstance(value, dict):
        return {key: _substitute(item, sections) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, sections) for item in value]
    if not isinstance(value, str) or "$" not in value:
        return value
    whole = _REFERENCE.fullmatch(value)
    if whole is not None:
        found = _resolve(whole, sections)
        return value if found is _MISSING else found

    def replace(match: re.Match[str]) -> str:
        found = _resolve(match, sections)
        if found is _MISSING:
            return match.group(0)  # an unresolvable reference stays as written
        if isinstance(found, list | dict):
            return ",".join(str(v) for v in (found.values() if isinstance(found, dict) else found))
        return str(found)

    return _REFERENCE.sub(replace, value)


def _resolve(match: re.Match[str], sections: dict[str, dict[str, Any]]) -> Any:
    current: Any = sections[match.group(1)]
    for segment in _SEGMENT.findall(match.group(2)):
        if isinstance(current, Mapping) and segment in current:
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit() and int(segment) < len(current):
            current = current[int(segment)]
        else:
            return _MISSING
    if isinstance(current, bool):
        return int(current)
    return current
