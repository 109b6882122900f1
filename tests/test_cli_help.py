"""Every subcommand explains itself: ``--help`` has a description and example command lines,
and every example parses."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from bridge import cli, demo
from bridge.emulators.bitrix24 import cli as emulator_cli


def subcommands() -> list[str]:
    parser = cli._parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def help_text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def parser_of(command: str) -> argparse.ArgumentParser:
    if command == "emulator":
        return emulator_cli.build_parser()
    if command == "demo":
        return demo._parser()
    return cli._parser()


def example_lines(text: str) -> list[str]:
    _, found, tail = text.partition("\nexamples:\n")
    assert found, "no 'examples:' section"
    lines = []
    for line in tail.splitlines():
        if not line.startswith("  "):
            break
        lines.append(line.strip())
    return lines


def test_every_command_is_walked() -> None:
    # The walk below must see the commands the README documents (a new one joins by itself).
    assert {"serve", "drain", "status", "bind", "backup", "emulator", "demo"} <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_help_has_a_description_and_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(capsys, command)
    assert text.startswith(f"usage: bitrix24-bridge {command}")
    # The description: the paragraph between the usage and the options.
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text)]
    description = paragraphs[1]
    assert len(description.split()) >= 8, f"{command}: description too thin: {description!r}"
    assert not description.startswith(("options:", "positional arguments:"))
    lines = example_lines(text)
    assert lines, f"{command}: no example"
    for line in lines:
        words = shlex.split(line.split(" || ")[0])
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words.pop(0)  # VAR=value prefixes
        assert words[:2] == ["bitrix24-bridge", command], line
        # Every example is a valid command line for that command's parser.
        own = command in cli.OWN_PARSERS
        parsed = parser_of(command).parse_args(words[2:] if own else words[1:])
        assert own or parsed.command == command


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in subcommands():
        assert re.search(rf"^\s+{command}\s+\S", text, re.MULTILINE), command
    assert example_lines(text)
