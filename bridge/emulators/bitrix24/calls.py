"""The path of one REST request, in the order ``CRestServer`` takes it.

Rate limit, method lookup, token (the ``Authorization`` header wins over ``auth``) and
``auth_connector`` belong to the outer request; then each call, plain or inside a ``batch``,
meets injected faults, the operating-time ban, the admin check and the method itself. Only a
successful call is charged operating time and answers a ``time`` block.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.emulators.bitrix24 import params as read
from bridge.emulators.bitrix24.batch import command_methods
from bridge.emulators.bitrix24.errors import RestError
from bridge.emulators.bitrix24.model import Call, Reply
from bridge.emulators.bitrix24.operating import Meter
from bridge.emulators.bitrix24.portal import Portal
from bridge.emulators.bitrix24.rest import METHODS


@dataclass(slots=True)
class Handled:
    reply: Reply
    dropped: bool = False  # the server acted, but the answer must never reach the client
    commands: tuple[str, ...] | None = None  # a batch's: the methods of its commands, in order


def handle(portal: Portal, path: str, params: dict[str, Any], bearer: str | None) -> Handled:
    """One HTTP request to ``/rest/{path}``."""
    segments = [segment for segment in path.split("/") if segment]
    method = method_name(segments[-1] if segments else "")
    portal.calls[method] += 1
    commands = command_methods(params) if method == "batch" else None
    now = portal.now()
    portal.clean_if_due(now)
    # Auth parameters never reach the method (OAuth\Auth: parameters_clear).
    token = (
        bearer or read.text(params.pop("auth", None)) or read.text(params.pop("access_token", None))
    )
    connector = read.text(params.pop("auth_connector", None))
    try:
        if len(segments) > 1:
            # /rest/<user>/<code>/<method>: an incoming webhook, not an application token.
            raise RestError("WRONG_AUTH_TYPE")
        if not portal.bucket.hit(now):
            raise RestError("QUERY_LIMIT_EXCEEDED")
        if method not in METHODS:
            raise RestError("ERROR_METHOD_NOT_FOUND", f"Method '{method}' not found")
        user_id = portal.tokens.user_of(token or None, now)
        if connector and not portal.config.auth_connector_feature:
            raise RestError("WRONG_LICENSE", "This feature is not enabled: auth_connector")
    except RestError as exc:
        portal.errors[exc.code] += 1
        return Handled(Reply(error=exc), commands=commands)
    meter = portal.operating.meter(now)
    reply = invoke(portal, method, params, user_id, connector, meter, counted=True)
    portal.operating.finalize(meter, portal.now())
    dropped = reply.reserved and portal.faults.drop_next_reservation
    if dropped:
        portal.faults.drop_next_reservation = False
    return Handled(reply, dropped, commands)


def method_name(raw: str) -> str:
    return raw.strip().lower().removesuffix(".json")


def invoke(
    portal: Portal,
    method: str,
    params: dict[str, Any],
    user_id: int,
    connector: str,
    meter: Meter,
    *,
    counted: bool = False,
) -> Reply:
    """Run one method for an authenticated user; a batch's commands come through here too."""
    if not counted:
        portal.calls[method] += 1
    start = portal.now()
    began = portal.perf()
    spec = METHODS.get(method)
    try:
        if spec is None:
            raise RestError("ERROR_METHOD_NOT_FOUND", f"Method '{method}' not found")
        injected = portal.faults.take(method)
        if injected is not None:
            raise injected
        if portal.operating.blocked(method, start, meter):
            raise RestError("OPERATION_TIME_LIMIT")
        if spec.admin and not portal.is_admin(user_id):
            raise RestError("ACCESS_DENIED", "Access denied! Admin access required")

        def command(name: str, command_params: dict[str, Any]) -> Reply:
            return invoke(portal, name, command_params, user_id, connector, meter)

        normalized = {str(key).upper(): value for key, value in params.items()}
        # A command's own auth parameters are overwritten by the batch request's.
        for name in ("AUTH", "ACCESS_TOKEN", "AUTH_CONNECTOR"):
            normalized.pop(name, None)
        outcome = spec.handler(Call(portal, normalized, user_id, connector, command))
    except RestError as exc:
        portal.errors[exc.code] += 1
        return Reply(error=exc)
    config = portal.config
    processing = portal.perf() - began
    modelled = config.op_cost_per_call + config.op_cost_per_row * outcome.rows + outcome.modelled
    meter.register(method, start, processing + modelled)
    return Reply(
        result=outcome.result,
        total=outcome.total,
        next=outcome.next,
        time=_time(portal, method, start, processing, meter),
        reserved=outcome.reserved,
        modelled=modelled,
    )


def _time(
    portal: Portal, method: str, start: float, processing: float, meter: Meter
) -> dict[str, Any]:
    finish = max(portal.now(), start)
    zone = portal.store.zone
    answer: dict[str, Any] = {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": processing,
        "date_start": datetime.fromtimestamp(start, zone).isoformat(timespec="seconds"),
        "date_finish": datetime.fromtimestamp(finish, zone).isoformat(timespec="seconds"),
    }
    reset_at = portal.operating.reset_at(method, finish, meter)
    if reset_at is not None:
        answer["operating_reset_at"] = reset_at
    answer["operating"] = round(portal.operating.used(method, finish, meter), 6)
    return answer
