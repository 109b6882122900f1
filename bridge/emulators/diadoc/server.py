"""A running Diadoc emulator on a loopback socket: ``with DiadocEmulatorServer() as diadoc:``."""

from __future__ import annotations

from types import TracebackType

from bridge.emulators.diadoc.app import create_diadoc_app
from bridge.emulators.diadoc.model import DiadocEmulator
from bridge.emulators.kit import ThreadedServer


class DiadocEmulatorServer:
    def __init__(
        self,
        model: DiadocEmulator | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.model = model if model is not None else DiadocEmulator()
        self._runner = ThreadedServer(host, port, log_level=log_level)
        self.host = host

    def start(self) -> DiadocEmulatorServer:
        self._runner.bind()
        self._runner.serve(create_diadoc_app(self.model))
        return self

    def stop(self) -> None:
        self._runner.stop()

    def __enter__(self) -> DiadocEmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._runner.port

    @property
    def api_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.api_url}/connect/token"

    def env(self, boxes: tuple[str, ...] | None = None) -> dict[str, str]:
        """``BRIDGE_DIADOC_*`` variables that point the bridge at this emulator."""
        return {
            "BRIDGE_DIADOC_API_URL": self.api_url,
            "BRIDGE_DIADOC_TOKEN_URL": self.token_url,
            "BRIDGE_DIADOC_CLIENT_ID": self.model.client_id,
            "BRIDGE_DIADOC_CLIENT_SECRET": self.model.client_secret,
            "BRIDGE_DIADOC_REFRESH_TOKEN": self.model.issue_refresh_token(),
            "BRIDGE_DIADOC_BOXES": ",".join(boxes if boxes is not None else self.model.boxes),
        }
