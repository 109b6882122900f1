"""Run an ASGI app under uvicorn on a real loopback socket, in a background thread."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from bridge.emulators.bitrix24.app import create_emulator_app
from bridge.emulators.bitrix24.config import EmulatorConfig
from bridge.emulators.bitrix24.portal import Portal
from bridge.emulators.kit import ThreadedServer

T = TypeVar("T")


class EmulatorServer:
    """A running emulator: ``with EmulatorServer(EmulatorConfig()) as emulator: ...``."""

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        log_level: str | None = None,
        log_config: dict[str, Any] | None = None,
    ) -> None:
        config = config if config is not None else EmulatorConfig()
        tls = None
        if config.tls_certfile:
            tls = (config.tls_certfile, config.tls_keyfile or config.tls_certfile)
        self._runner = ThreadedServer(
            config.host, config.port, log_level=log_level, log_config=log_config, tls=tls
        )
        self.config = config
        self.portal: Portal | None = None

    def start(self) -> EmulatorServer:
        port = self._runner.bind()
        # The domain, and every endpoint the portal announces, include the bound port.
        self.config = dataclasses.replace(self.config, port=port)
        self.portal = Portal(self.config)
        self._runner.serve(create_emulator_app(self.config, portal=self.portal))
        return self

    def stop(self) -> None:
        self._runner.stop()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run_in_loop(self, fn: Callable[[], T], *, timeout: float = 10.0) -> T:
        return self._runner.run_in_loop(fn, timeout=timeout)

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def domain(self) -> str:
        return self.config.domain

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def client_endpoint(self) -> str:
        return self.config.client_endpoint

    @property
    def oauth_url(self) -> str:
        return self.config.base_url

    @property
    def token_url(self) -> str:
        return f"{self.config.base_url}/oauth/token/"
