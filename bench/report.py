"""Results: what a scenario measured, the targets it is held to, a table and a JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    """One informational target: ``value`` compared with ``target`` (never fails a build)."""

    name: str
    value: float | None
    target: float
    op: str = ">="  # ">=" or "<="
    unit: str = ""

    @property
    def ok(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Result:
    name: str
    title: str
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def check(self, name: str, value: float | None, op: str, target: float, unit: str = "") -> None:
        self.checks.append(Check(name, value, target, op, unit))

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "metrics": self.metrics,
            "checks": [c.as_dict() for c in self.checks],
            "notes": self.notes,
            "error": self.error,
            "seconds": round(self.seconds, 2),
        }


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value.is_integer() and abs(value) < 1e15:
            return fmt(int(value))
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _verdict(check: Check) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[check.ok]


def table(results: Sequence[Result]) -> str:
    """One block per scenario: its metrics, then its targets with PASS/FAIL."""
    blocks: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    for result in results:
        rows: list[tuple[str, str, str, str]] = []
        if result.error:
            rows.append(("error", result.error[:100], "", "ERROR"))
        for key, value in result.metrics.items():
            if not isinstance(value, list | dict):
                rows.append((key, fmt(value), "", ""))
        for check in result.checks:
            unit = f" {check.unit}" if check.unit else ""
            target = f"{check.op} {fmt(check.target)}{unit}"
            rows.append((f"target: {check.name}", fmt(check.value), target, _verdict(check)))
        blocks.append((f"{result.title}  [{result.seconds:.0f} s]", rows))
    headers = ("metric", "value", "target", "result")
    every = [row for _, rows in blocks for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in every]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    for title, rows in blocks:
        out.append(f"## {title}")
        out.extend(line(row) for row in rows)
    notes = [(r.title, n) for r in results for n in r.notes]
    if notes:
        out.append("")
        out.extend(f"note ({title}): {note}" for title, note in notes)
    return "\n".join(out)


def document(results: Sequence[Result], *, quick: bool, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "argv": list(argv),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "scenarios": {r.name: r.as_dict() for r in results},
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
