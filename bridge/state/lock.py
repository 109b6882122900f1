"""One process owns a state file: the one that drains from it and refreshes its tokens.

Refresh tokens rotate, so two processes refreshing from the same file kill each other's
token. ``serve``, ``drain``, ``bind`` and ``parked --replay`` take an exclusive ``flock`` on
``<state file>.lock`` and hold it until they exit; the kernel releases it when a process dies,
so a crash never leaves a stale lock behind. ``status`` and ``parked`` only read and need none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from bridge.core.errors import ConfigError


class StateLock:
    def __init__(self, state_path: str) -> None:
        self.path = Path(f"{state_path}.lock")
        self._fd: int | None = None

    def acquire(self, purpose: str) -> None:
        """Take the lock or raise ConfigError naming the process that holds it."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {self.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(
                f"the state file is in use by another bitrix24-bridge process ({holder}); "
                "only one process may drain it and refresh its tokens at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{purpose}, pid {os.getpid()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown process"
