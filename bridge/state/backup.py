"""``bitrix24-bridge backup PATH``: a consistent copy of the state file, taken while it is in use.

SQLite's online backup API copies the database page by page from a read-only connection, so a
running ``serve`` keeps writing (the file is in WAL mode: a reader never blocks the writer) and
the copy is one consistent snapshot. No ``sqlite3`` binary is needed, which the image lacks.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from bridge.core.errors import ConfigError, StateError

# The copy holds administrator tokens, like the state file itself.
FILE_MODE = 0o600


def backup(state_path: str, target: str, *, force: bool = False) -> int:
    """Copy the state file to ``target``; returns the copy's size in bytes.

    The copy is written beside the target and renamed into place only once SQLite's integrity
    check passed, so a failed backup never leaves a half-written file under the target's name.
    """
    source, dest = Path(state_path), Path(target)
    if not source.is_file():
        raise ConfigError(f"no state file at {source} (BRIDGE_STATE_PATH): nothing to back up")
    if dest.is_dir():
        raise ConfigError(f"{dest} is a directory: give the backup's file name")
    if dest.exists() and dest.resolve() == source.resolve():
        raise ConfigError("the backup cannot overwrite the state file itself")
    if dest.exists() and not force:
        raise ConfigError(f"{dest} exists: choose another name or pass --force to replace it")
    if not dest.parent.is_dir():
        raise ConfigError(f"directory {dest.parent} does not exist")
    partial = dest.with_name(dest.name + ".partial")
    try:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        os.close(os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_EXCL, FILE_MODE))
        _copy(source, partial)
        os.replace(partial, dest)
    except sqlite3.Error as exc:
        raise StateError(f"backup of {source} failed: {exc}") from exc
    except OSError as exc:
        raise StateError(f"cannot write the backup {dest}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return dest.stat().st_size


def _copy(source: Path, partial: Path) -> None:
    # Read-only: the backup must not change the live file, and takes no writer's lock.
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)
            # A self-contained single file: no -wal beside the copy.
            dst.execute("PRAGMA journal_mode=DELETE")
            (result,) = dst.execute("PRAGMA integrity_check").fetchone()
            if result != "ok":
                raise sqlite3.DatabaseError(f"integrity check of the copy: {result}")
        finally:
            dst.close()
    finally:
        src.close()
