"""A Diadoc emulator for tests and demos: docflow events with IndexKeys (ties included), late,
duplicate and malformed deliveries, departments, API versions with their deprecation headers, an
OpenID Connect token endpoint with rotating refresh tokens, injectable faults."""

from bridge.emulators.diadoc.app import create_diadoc_app
from bridge.emulators.diadoc.events import StoredEvent
from bridge.emulators.diadoc.faults import FaultRule
from bridge.emulators.diadoc.model import DiadocEmulator
from bridge.emulators.diadoc.server import DiadocEmulatorServer

__all__ = [
    "DiadocEmulator",
    "DiadocEmulatorServer",
    "FaultRule",
    "StoredEvent",
    "create_diadoc_app",
]
