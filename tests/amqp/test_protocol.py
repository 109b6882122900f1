"""A :class:`Confirmed` is made by a publisher of ``bridge.amqp`` and by nothing else: its
constructor refuses any caller without the package's seal, and no module outside the package
names the seal or the function that uses it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bridge
from bridge.amqp.fake import MemoryPublisher
from bridge.amqp.protocol import Confirmed, OutgoingMessage

PACKAGE = Path(bridge.__file__).parent
PRIVATE = frozenset({"_SEAL", "_Seal", "_confirm"})


def message(key: str) -> OutgoingMessage:
    return OutgoingMessage(
        exchange="bitrix24.oncrmleadadd",
        routing_key="portal.test",
        body=b"{}",
        message_id=f"m:{key}",
        type="ONCRMLEADADD",
        timestamp=None,
        headers={},
        key=key,
    )


@pytest.mark.parametrize("seal", [None, object(), "seal"])
def test_a_confirmation_cannot_be_made_without_the_seal(seal: object) -> None:
    with pytest.raises(TypeError, match="only a publisher confirms messages"):
        Confirmed([message("a")], seal=seal)


async def test_a_publisher_hands_out_a_proof_of_exactly_what_it_stored() -> None:
    publisher = MemoryPublisher()
    publisher.refuse(lambda m: m.key == "b", "nack")
    result = await publisher.publish([message("a"), message("b"), message("c")])
    assert isinstance(result.proof, Confirmed)
    assert result.proof.keys == ("a", "c")
    publisher.down = True
    assert (await publisher.publish([message("d")])).proof is None  # nothing to prove


def references_outside_amqp(root: Path) -> list[str]:
    """Every use of the seal or of ``_confirm`` (a name, an attribute, an import) in a module
    of ``root`` that is not under ``root/amqp``, as ``path:line name``."""
    found: list[tuple[str, int, str]] = []
    for path in sorted(root.rglob("*.py")):
        if (root / "amqp") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [alias.name.rsplit(".", 1)[-1] for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]  # getattr(protocol, "_SEAL") is a reference too
            line = getattr(node, "lineno", 0)
            for name in names:
                if name in PRIVATE:
                    found.append((str(path.relative_to(root.parent)), line, name))
    return [f"{path}:{line} {name}" for path, line, name in sorted(found)]


def test_no_module_outside_the_amqp_package_touches_the_seal() -> None:
    assert references_outside_amqp(PACKAGE) == []


def test_the_scan_finds_a_forged_proof(tmp_path: Path) -> None:
    root = tmp_path / "bridge"
    (root / "amqp").mkdir(parents=True)
    (root / "amqp" / "protocol.py").write_text("_SEAL = object()\n")
    (root / "bitrix24").mkdir()
    (root / "bitrix24" / "forged.py").write_text(
        "from bridge.amqp import protocol\n"
        "from bridge.amqp.protocol import _confirm\n"
        "proof = protocol.Confirmed([], seal=protocol._SEAL)\n"
        "seal = getattr(protocol, '_SEAL')\n"
    )
    assert references_outside_amqp(root) == [
        "bridge/bitrix24/forged.py:2 _confirm",
        "bridge/bitrix24/forged.py:3 _SEAL",
        "bridge/bitrix24/forged.py:4 _SEAL",
    ]
