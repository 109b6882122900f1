"""A faithful Bitrix24 portal emulator: REST, OAuth, offline queue, limits and notifications."""

from bridge.emulators.bitrix24.app import create_emulator_app
from bridge.emulators.bitrix24.config import EmulatorConfig, FakeClock
from bridge.emulators.bitrix24.errors import RestError
from bridge.emulators.bitrix24.portal import Portal
from bridge.emulators.bitrix24.server import EmulatorServer
from bridge.emulators.kit import ThreadedServer

__all__ = [
    "EmulatorConfig",
    "EmulatorServer",
    "FakeClock",
    "Portal",
    "RestError",
    "ThreadedServer",
    "create_emulator_app",
]
