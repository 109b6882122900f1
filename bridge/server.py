"""uvicorn, with signals handled the way a service manager expects."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn


class Server(uvicorn.Server):
    """Shuts down gracefully on SIGTERM/SIGINT and then exits normally.

    uvicorn re-raises the captured signal after its graceful shutdown, which turns a clean stop
    into "killed by SIGTERM" (exit status -15); a clean stop should exit 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
