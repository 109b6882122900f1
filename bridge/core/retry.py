"""Back-off between attempts: exponential with full jitter."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential back-off with full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))
