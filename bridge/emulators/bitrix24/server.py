"""Run an ASGI app under uvicorn on a real loopback socket, in a background thread."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from bridge.emulators.bitrix24.app import create_emulator_app
from bridge.emulators.bitrix24.calllog import DEFAULT_CAPACITY, CallLog
from bridge.emulators.bitrix24.config import EmulatorConfig
from bridge.emulators.bitrix24.farm import Farm, addresses, portal_configs
from bridge.emulators.bitrix24.portal import Portal
from bridge.emulators.kit import ThreadedServer

T = TypeVar("T")


class EmulatorServer:
    """A running emulator: ``with EmulatorServer(EmulatorConfig()) as emulator: ...``.

    ``portals`` above 1 runs a farm (see ``farm.py``): ``config`` is the first portal's, and
    ``portal`` is the first portal, ``farm`` all of them. ``call_log_path`` writes the call log
    as JSON lines too; ``call_log_size`` entries of it are kept in memory.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        portals: int = 1,
        call_log_path: str | None = None,
        call_log_size: int = DEFAULT_CAPACITY,
        log_level: str | None = None,
        log_config: dict[str, Any] | None = None,
    ) -> None:
        config = config if config is not None else EmulatorConfig()
        portal_configs(config, portals)  # a bad combination fails here, before any socket
        tls = None
        if config.tls_certfile:
            tls = (config.tls_certfile, config.tls_keyfile or config.tls_certfile)
        self._runner = ThreadedServer(
            config.host,
            config.port,
            log_level=log_level,
            log_config=log_config,
            tls=tls,
            also=addresses(config.host, portals)[1:],
        )
        self.config = config
        self._portals = portals
        self._call_log = (call_log_path, call_log_size)
        self.portal: Portal | None = None
        self.farm: Farm | None = None

    def start(self) -> EmulatorServer:
        port = self._runner.bind()
        # The domain, and every endpoint the portal announces, include the bound port.
        self.config = dataclasses.replace(self.config, port=port)
        path, size = self._call_log
        self.farm = Farm.of(self.config, self._portals, CallLog(size, path))
        self.portal = self.farm.portals[0]
        try:
            self._runner.serve(create_emulator_app(self.config, farm=self.farm))
        except BaseException:
            self.farm.close()
            raise
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
