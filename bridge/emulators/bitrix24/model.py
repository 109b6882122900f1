"""What a REST method gets and gives back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.emulators.bitrix24.errors import RestError

if TYPE_CHECKING:
    from bridge.emulators.bitrix24.portal import Portal


@dataclass(slots=True)
class Reply:
    """The answer to one call, plain or inside a batch. An error carries no ``time``."""

    result: Any = None
    total: int | None = None
    next: int | None = None
    error: RestError | None = None
    time: dict[str, Any] | None = None
    reserved: bool = False  # rows were reserved under a new process_id
    modelled: float = 0.0  # operating seconds the benchmark knobs added (a batch adds them up)

    def body(self) -> dict[str, Any]:
        if self.error is not None:
            return self.error.body()
        answer: dict[str, Any] = {"result": self.result}
        if self.total is not None:
            answer["total"] = self.total
        if self.next is not None:
            answer["next"] = self.next
        if self.time is not None:
            answer["time"] = self.time
        return answer

    @property
    def status(self) -> int:
        return 200 if self.error is None else self.error.status


Invoke = Callable[[str, dict[str, Any]], Reply]


@dataclass(slots=True)
class Call:
    portal: Portal
    params: dict[str, Any]  # top-level keys upper-cased, as Bitrix24 reads them
    user_id: int
    # The request's auth_connector: read from the outer request only, never from a batch
    # command's own parameters (Auth::$authQueryAdditional; rest_provider.php methodsBatch).
    connector: str
    invoke: Invoke  # runs another method in the same request (batch)


@dataclass(slots=True)
class Outcome:
    result: Any
    total: int | None = None
    next: int | None = None
    rows: int = 0  # rows read, for the modelled operating cost
    reserved: bool = False
    modelled: float = 0.0  # modelled seconds of the calls made inside this one (a batch's)


@dataclass(frozen=True, slots=True)
class Method:
    handler: Callable[[Call], Outcome]
    admin: bool = False
