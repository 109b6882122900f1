"""Tokens sealed at rest with ``BRIDGE_STATE_KEY``: one rule for every state backend.

A sealed value is ``fernet:`` followed by the Fernet token; anything else is stored plain (no key
was set when it was written). With several keys the first seals and all of them open, so a key
rotation never locks a replica out of what another one wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from bridge.core.errors import StateError

SEALED = "fernet:"
SECRET_FIELDS = ("access_token", "refresh_token", "application_token")


class Sealer:
    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys]) if keys else None

    def seal(self, value: str) -> str:
        if self._fernet is None or not value:
            return value
        return SEALED + self._fernet.encrypt(value.encode()).decode()

    def open(self, value: str) -> str:
        if not value.startswith(SEALED):
            return value
        if self._fernet is None:
            raise StateError("the state holds encrypted tokens but BRIDGE_STATE_KEY is not set")
        try:
            return self._fernet.decrypt(value[len(SEALED) :].encode()).decode()
        except InvalidToken:
            raise StateError(
                "BRIDGE_STATE_KEY cannot decrypt the stored tokens (wrong key? "
                "when rotating, list the new key first and keep the old one after it)"
            ) from None
