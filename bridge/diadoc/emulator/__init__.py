"""A Diadoc emulator for tests and demos: docflow events with IndexKeys, late and duplicate
deliveries, an OpenID Connect token endpoint with rotating refresh tokens, injectable faults."""

from bridge.diadoc.emulator.app import create_diadoc_app
from bridge.diadoc.emulator.model import DiadocEmulator, FaultRule, StoredEvent
from bridge.diadoc.emulator.server import DiadocEmulatorServer

__all__ = [
    "DiadocEmulator",
    "DiadocEmulatorServer",
    "FaultRule",
    "StoredEvent",
    "create_diadoc_app",
]
