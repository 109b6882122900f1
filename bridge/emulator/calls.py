"""The path of one REST request: rate limit, token, method, faults, operating time, ``time``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.emulator.errors import RestError
from bridge.emulator.model import Call, Reply
from bridge.emulator.portal import Portal
from bridge.emulator.rest import METHODS


@dataclass(slots=True)
class Handled:
    reply: Reply
    dropped: bool = False  # the server acted, but the answer must never reach the client


def handle(portal: Portal, path: str, params: dict[str, Any], bearer: str | None) -> Handled:
    """One HTTP request to ``/rest/{path}``."""
    segments = [segment for segment in path.split("/") if segment]
    method = _method_name(segments[-1] if segments else "")
    portal.calls[method] += 1
    token = params.pop("auth", None) or bearer
    try:
        if len(segments) > 1:
            # /rest/<user>/<code>/<method>: an incoming webhook, not an application token.
            raise RestError("WRONG_AUTH_TYPE")
        if not portal.bucket.hit(portal.now()):
            raise RestError("QUERY_LIMIT_EXCEEDED")
        user_id = portal.tokens.user_of(token if isinstance(token, str) else None, portal.now())
    except RestError as exc:
        portal.errors[exc.code] += 1
        return Handled(Reply(error=exc))
    reply = invoke(portal, method, params, user_id, counted=True)
    dropped = reply.reserved and portal.faults.drop_next_reservation
    if dropped:
        portal.faults.drop_next_reservation = False
    return Handled(reply, dropped)


def _method_name(raw: str) -> str:
    return raw.strip().lower().removesuffix(".json")


def invoke(
    portal: Portal, method: str, params: dict[str, Any], user_id: int, *, counted: bool = False
) -> Reply:
    """Run one method for an authenticated user; a batch's sub-calls come through here too."""
    if not counted:
        portal.calls[method] += 1
    start = portal.now()
    began = portal.perf()
    spec = METHODS.get(method)
    try:
        if spec is None:
            raise RestError("ERROR_METHOD_NOT_FOUND", f"Method '{method}' not found")
        injected = portal.faults.take_failure(method)
        if injected is not None:
            raise RestError(injected)
        if spec.admin and not portal.is_admin(user_id):
            raise RestError("ACCESS_DENIED", "Access denied! Admin access required")
        if portal.operating.exceeded(method, start):
            raise RestError("OPERATION_TIME_LIMIT")

        def sub_call(name: str, sub_params: dict[str, Any]) -> Reply:
            return invoke(portal, _method_name(name), sub_params, user_id)

        normalized = {str(key).upper(): value for key, value in params.items()}
        normalized.pop("AUTH", None)
        outcome = spec.handler(Call(portal, normalized, user_id, sub_call))
    except RestError as exc:
        portal.errors[exc.code] += 1
        with_time = spec is not None
        return Reply(error=exc, time=_time(portal, method, start, began) if with_time else None)
    processing = portal.perf() - began
    config = portal.config
    cost = (
        max(0.0, processing - outcome.charged_elsewhere)
        + config.op_cost_per_call
        + config.op_cost_per_row * outcome.rows
    )
    portal.operating.charge(method, cost, portal.now())
    return Reply(
        result=outcome.result,
        total=outcome.total,
        next=outcome.next,
        time=_time(portal, method, start, began),
        reserved=outcome.reserved,
    )


def _time(portal: Portal, method: str, start: float, began: float) -> dict[str, Any]:
    finish = max(portal.now(), start)
    zone = portal.store.zone
    return {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": portal.perf() - began,
        "date_start": datetime.fromtimestamp(start, zone).isoformat(timespec="seconds"),
        "date_finish": datetime.fromtimestamp(finish, zone).isoformat(timespec="seconds"),
        "operating": round(portal.operating.used(method, finish), 6),
        "operating_reset_at": portal.operating.reset_at(method, finish),
    }
