"""``POST /bitrix24/events``: the notifications a portal sends. Answers at once; never drains."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bridge.bitrix24 import phpquery
from bridge.core.errors import BridgeError, TokenError
from bridge.service import Service

log = logging.getLogger(__name__)

MAX_BODY = 65_536
BODY_TIMEOUT = 10.0
FORM = "application/x-www-form-urlencoded"
# A notification has about 15 keys, two levels deep (``data[FIELDS][ID]``). Parsing is pure
# Python on the event loop: 1,000 keys 16 deep took 0.1 s per unauthenticated request.
NOTIFICATION_KEYS = 128
NOTIFICATION_DEPTH = 4


class Refused(Exception):
    def __init__(self, status: int, error: str, outcome: str) -> None:
        self.status = status
        self.error = error
        self.outcome = outcome


# Built once: a Response only reads its fields when it is sent.
_OK = Response(b'{"status":"ok"}', media_type="application/json")


def _answer(status: int, error: str) -> Response:
    return JSONResponse({"error": error}, status_code=status)


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY:
                raise Refused(413, "body too large", "too_large")
        except ValueError:
            raise Refused(400, "bad content-length", "bad_request") from None
    # The ASGI messages themselves, without Starlette's stream generator: this runs on every
    # notification, and a notification is one message.
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    try:
        # A notification is a few hundred bytes: a body trickling in is an attack on our sockets.
        async with asyncio.timeout(BODY_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise Refused(400, "body truncated", "bad_request")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY:
                    raise Refused(413, "body too large", "too_large")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise Refused(400, "body too slow", "bad_request") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse(content_type: str, body: bytes) -> Mapping[str, Any]:
    """The notification's fields; the result is shared between requests: read it, never write."""
    media = content_type.split(";", 1)[0].strip().lower()
    if len(body) <= CACHED_BODY:
        return _parse_cached(media, body)
    return _parse(media, body)


def _parse(media: str, body: bytes) -> Mapping[str, Any]:
    if media == FORM:
        try:
            data: Any = phpquery.decode(
                body.decode("utf-8"), max_depth=NOTIFICATION_DEPTH, max_keys=NOTIFICATION_KEYS
            )
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "malformed form body", "bad_request") from None
    elif media == "application/json":
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise Refused(400, "malformed JSON body", "bad_request") from None
    else:
        raise Refused(415, "unsupported content type", "unsupported")
    if not isinstance(data, dict) or not isinstance(data.get("event"), str) or not data["event"]:
        raise Refused(400, "no event", "bad_request")
    return data


# A portal's notifications carry only the event, its ``ts`` (whole seconds) and its credentials:
# every notification one portal sends within a second is the same body, byte for byte, and a
# busy portal sends many. Those are parsed once. Only successful parses are kept, and only of
# small bodies, so neither hostile nor large bodies can make the cache grow past ~256 KiB.
CACHED_BODY = 4096
_parse_cached = functools.lru_cache(maxsize=64)(_parse)


def _text(block: Mapping[str, Any], key: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        return ""
    try:
        # A JSON body may carry lone surrogates (``"\ud800"``): no real credential has one,
        # and comparing or sending it would raise.
        value.encode()
    except UnicodeEncodeError:
        return ""
    return value


def _auth(data: Mapping[str, Any]) -> Mapping[str, Any]:
    auth = data.get("auth")
    return auth if isinstance(auth, dict) else {}


def _ts(data: Mapping[str, Any]) -> float | None:
    try:
        ts = float(data.get("ts"))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None  # a JSON integer of 400 digits overflows
    # NaN compares false with everything: it would make the drainer think nothing is due.
    return ts if math.isfinite(ts) else None


async def handle(request: Request, service: Service) -> Response:
    event = "unknown"
    try:
        if service.closing:
            raise Refused(503, "shutting down", "unavailable")
        body = await read_body(request)
        data = parse(request.headers.get("content-type", ""), body)
        event = data["event"].upper()
        auth = _auth(data)
        member_id = _text(auth, "member_id")
        if event in ("ONOFFLINEEVENT", "ONAPPUNINSTALL"):
            token = _text(auth, "application_token")
            if event == "ONOFFLINEEVENT":
                # The owner's drainer wakes (in scaled mode perhaps on another replica).
                known = service.bitrix24.wake(member_id, token, _ts(data))
            else:
                known = await service.bitrix24.remove(member_id, token)
            if not known:
                raise Refused(401, "unauthorized", "unauthorized")
        elif event == "ONAPPINSTALL":
            refresh = _text(auth, "refresh_token")
            app_token = _text(auth, "application_token")
            if not (member_id and refresh and app_token):
                raise Refused(401, "unauthorized", "unauthorized")
            try:
                await service.bitrix24.install(member_id, refresh, app_token)
            except TokenError:
                raise Refused(401, "unauthorized", "unauthorized") from None
            except BridgeError:
                # The OAuth server could not be asked: the install is not proven, try again later.
                raise Refused(503, "install could not be verified now", "unavailable") from None
        else:
            # Other events are not ours to handle; say nothing about whether the portal exists.
            raise Refused(401, "unauthorized", "unauthorized")
    except Refused as refused:
        _count(service, event, refused.outcome)
        return _answer(refused.status, refused.error)
    _count(service, event, "accepted")
    return _OK


_KNOWN = frozenset({"ONOFFLINEEVENT", "ONAPPINSTALL", "ONAPPUNINSTALL"})


def _count(service: Service, event: str, outcome: str) -> None:
    # Event names come from the request: keep the label set bounded.
    label = event if event in _KNOWN else "other"
    service.metrics.count_notification(label, outcome)
