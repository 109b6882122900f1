"""Logging: one JSON object per line (or plain text for humans), never a token."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else came in through ``extra=`` and is a field.
# uvicorn adds an ANSI-coloured copy of some messages as ``color_message``: terminal escapes
# have no place in a log pipeline, and the plain message is already there.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _error(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        return f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_fields(record))
        error = _error(record)
        if error is not None:
            # "error" for a quick look and grouping, "exception" for the stack trace: the line
            # stays one JSON object, the trace is a field of it.
            data["error"] = error
            data["exception"] = self.formatException(record.exc_info)  # type: ignore[arg-type]
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        error = _error(record)
        if error is not None:
            line += f"  error={error}\n" + self.formatException(record.exc_info)  # type: ignore[arg-type]
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def configure(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; OAuth URLs carry the client secret and tokens.
    for noisy in ("httpx", "httpcore", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aiormq logs a failed connect at ERROR before raising; the publisher reports it itself.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
