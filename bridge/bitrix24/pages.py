"""Reserved pages and the part of them that may be cleared.

A :class:`ConfirmedPage` names, one by one, the events of a reservation that RabbitMQ confirmed
(or that a journal written after such a confirmation says were); it is the only thing
``event.offline.clear`` is ever called with. It never clears a whole process: a portal that
stamped rows it did not return would otherwise lose rows nobody read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.amqp.protocol import Confirmed


@dataclass(frozen=True, slots=True)
class Reservation:
    process_id: str
    rows: tuple[Mapping[str, Any], ...]
    replay: bool = False  # parked rows reserved again (read with error=1)


@dataclass(frozen=True, slots=True)
class ConfirmedPage:
    """Events of one reservation that may be cleared; ``done``: nothing else is left under it.

    Made with :meth:`of`, from the publisher's proof of this run and the journal's record of
    earlier confirmations (which itself was written only from such proofs).
    """

    process_id: str
    message_ids: tuple[str, ...]
    event_names: tuple[str, ...]
    done: bool

    @classmethod
    def of(
        cls,
        process_id: str,
        proof: Confirmed | None,
        recorded: Iterable[Mapping[str, Any]] = (),
        *,
        done: bool,
    ) -> ConfirmedPage | None:
        """The clearable part of a page (None when nothing was confirmed): the events ``proof``
        confirmed now, and the rows (``recorded``) the journal says were confirmed before."""
        keys = list(proof.keys) if proof is not None else []
        names = list(proof.types) if proof is not None else []
        for row in recorded:
            keys.append(str(row.get("MESSAGE_ID")))
            names.append(str(row.get("EVENT_NAME")))
        if not keys:
            return None
        return cls(process_id, tuple(keys), tuple(names), done)

    def __post_init__(self) -> None:
        # An empty process_id selects every unreserved row (free and parked) of the queue.
        if not self.process_id:
            raise ValueError("a confirmed page belongs to a reservation")
        # Bitrix24 reads an empty list as "the whole process": never send one.
        if not self.message_ids:
            raise ValueError("a confirmed page names at least one event")
        if len(self.message_ids) != len(self.event_names):
            raise ValueError("one event name per message id")

    def clear_params(self) -> dict[str, Any]:
        return {"process_id": self.process_id, "message_id": list(self.message_ids)}
