"""A Diadoc emulator for tests and demos: docflow events with IndexKeys (ties included), late,
duplicate and malformed deliveries, departments, API versions with their deprecation headers, an
OpenID Connect token endpoint with rotating refresh tokens, injectable faults."""

from bridge.diadoc.emulator.app import create_diadoc_app
from bridge.diadoc.emulator.events import StoredEvent
from bridge.diadoc.emulator.faults import FaultRule
from bridge.diadoc.emulator.model import DiadocEmulator
from bridge.diadoc.emulator.server import DiadocEmulatorServer

__all__ = [
    "DiadocEmulator",
    "DiadocEmulatorServer",
    "FaultRule",
    "StoredEvent",
    "create_diadoc_app",
]
