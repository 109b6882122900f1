"""What every scenario gets: the sizes to use, the broker, a scratch directory, shared results."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.broker import Broker

DEFAULT_SEED = 20261202


@dataclass
class Context:
    quick: bool
    broker: Broker
    workdir: Path
    # Results one scenario leaves for another (the memory scenario reuses the 50k drain).
    shared: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0  # the smoke test shrinks everything further
    # Every random draw of a scenario comes from this seed (``--seed``): runs compare, and a
    # run is repeated by giving its seed again.
    seed: int = DEFAULT_SEED

    def random(self, scenario: str) -> random.Random:
        """The generator of one scenario: the same seed, the same draws."""
        return random.Random(f"{self.seed}:{scenario}")

    def size(self, full: int, quick: int) -> int:
        return max(1, int((quick if self.quick else full) * self.scale))

    def seconds(self, full: float, quick: float) -> float:
        return (quick if self.quick else full) * (self.scale if self.scale < 1 else 1.0)

    def path(self, name: str) -> Path:
        return self.workdir / name
