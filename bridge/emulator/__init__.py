"""A faithful Bitrix24 portal emulator: REST, OAuth, offline queue, limits and notifications."""

from bridge.emulator.app import create_emulator_app
from bridge.emulator.config import EmulatorConfig, FakeClock
from bridge.emulator.errors import RestError
from bridge.emulator.portal import Portal
from bridge.emulator.server import EmulatorServer, ThreadedServer

__all__ = [
    "EmulatorConfig",
    "EmulatorServer",
    "FakeClock",
    "Portal",
    "RestError",
    "ThreadedServer",
    "create_emulator_app",
]
