"""Durable state: portals and tokens, the reservation journal, cursors of polled sources.

The embedded default is one SQLite file (:mod:`bridge.state.sqlite`); scaled mode keeps the same
interface in PostgreSQL (:mod:`bridge.state.pg`); :func:`bridge.state.open.open_state` picks one.
"""

from bridge.state.sqlite import (
    ACTIVE,
    UNINSTALLED,
    JournalEntry,
    ParkedRecord,
    Portal,
    State,
)

__all__ = ["ACTIVE", "UNINSTALLED", "JournalEntry", "ParkedRecord", "Portal", "State"]
