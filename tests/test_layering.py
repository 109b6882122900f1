"""The package's layers, read from its import graph with ``ast`` (nothing is imported): no module
under ``bridge/core`` or ``bridge/amqp`` depends on a source package (``bridge.bitrix24``,
``bridge.diadoc``) or on the emulators, directly or through another module of the package."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import bridge

PACKAGE = Path(bridge.__file__).parent
GENERIC = ("bridge.core", "bridge.amqp")
SOURCES = ("bridge.bitrix24", "bridge.diadoc", "bridge.emulators")


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions and TYPE_CHECKING included)."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from bridge import bitrix24` imports the subpackage: count the names as modules.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == root.name or m.startswith(root.name + ".")}


def graph(root: Path) -> dict[str, set[str]]:
    return {module_name(root, p): imports(root, p) for p in sorted(root.rglob("*.py"))}


def within(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(root: Path) -> list[str]:
    """Each generic module that reaches a source package, with the import chain that does."""
    edges = graph(root)
    found = []
    for start in sorted(m for m in edges if within(m, GENERIC)):
        # Breadth first, so the chain shown is a shortest one.
        chains: dict[str, list[str]] = {start: [start]}
        queue = [start]
        while queue:
            current = queue.pop(0)
            for target in sorted(edges.get(current, set())):
                if target in chains:
                    continue
                chains[target] = [*chains[current], target]
                if within(target, SOURCES):
                    found.append(" → ".join(chains[target]))
                    queue.clear()
                    break
                queue.append(target)
    return found


def test_core_and_amqp_import_no_source_package() -> None:
    edges = graph(PACKAGE)
    assert any(within(m, GENERIC) for m in edges), "the scan found no generic module"
    assert violations(PACKAGE) == []


def test_the_scan_names_the_offending_import_chain(tmp_path: Path) -> None:
    root = tmp_path / "bridge"
    for folder in ("core", "amqp", "bitrix24"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "metrics.py").write_text("from .bitrix24 import pacing\n")
    (root / "bitrix24" / "pacing.py").write_text("")
    (root / "core" / "drainer.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..metrics import M\n"
    )
    (root / "amqp" / "fake.py").write_text("def f():\n    import bridge.bitrix24.pacing\n")
    assert violations(root) == [
        "bridge.amqp.fake → bridge.bitrix24.pacing",
        "bridge.core.drainer → bridge.metrics → bridge.bitrix24",
    ]
