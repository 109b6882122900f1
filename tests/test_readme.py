"""Every command the README shows works as written: the Helm command renders and validates
with Helm's own engine, the emulator's curl calls run against the emulator started the way the
README starts it, the bridge's and the benchmark's command lines parse, the backup runs.

A fenced ``sh`` command of a kind this file does not know fails the test, so a new README
command needs a check here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import kubernetes_validate
import pytest
import yaml
from cryptography.fernet import Fernet
from kubernetes_validate.utils import latest_version

from bench.__main__ import parse_args as bench_args
from bridge import cli
from bridge.emulators.bitrix24 import cli as emulator_cli
from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_commands() -> list[str]:
    """Commands of the README's ``sh`` blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            text = " ".join(shlex.split(line, comments=True))
            if text:
                commands.append(line.split(" #", 1)[0].strip() if "#" in line else line.strip())
    return commands


def inline(prefix: str) -> list[str]:
    return sorted({c for c in re.findall(r"`([^`\n]+)`", README) if c.startswith(prefix)})


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def of_kind(*first: str) -> list[str]:
    return [c for c in fenced_commands() if words(c)[0] in first]


KNOWN = {"helm", "kubectl", "curl", "(umask", ".venv/bin/python"}
ENV_ASSIGNMENT = re.compile(r"[A-Z_]+=\S*")


def without_env(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """``VAR=value command ...`` as (environment, command words)."""
    env = {}
    while args and ENV_ASSIGNMENT.fullmatch(args[0]):
        name, _, value = args[0].partition("=")
        env[name] = value
        args = args[1:]
    return env, args


def test_every_fenced_command_has_a_check() -> None:
    commands = fenced_commands()
    assert len(commands) >= 10
    for command in commands:
        first = words(command)[0]
        if ENV_ASSIGNMENT.fullmatch(first):
            _, rest = without_env(words(command))
            assert rest[0] == "python", command
            assert rest[1].startswith("examples/"), command
            continue
        assert first in KNOWN or first.startswith("./scripts/"), f"no check for: {command}"


class Parsed(Exception):
    """Raised with the parsed arguments instead of running the program."""


def test_example_programs_accept_their_command_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import importlib.util

    examples = [
        without_env(words(c))
        for c in fenced_commands()
        if ENV_ASSIGNMENT.fullmatch(words(c)[0]) or words(c)[0] == "python"
    ]
    assert examples
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Any = None, ns: Any = None) -> Any:
        raise Parsed(parse(self, args, ns))  # a usage error exits 2 before this

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for env, args in examples:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location("readme_example", ROOT / args[1])
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(Parsed) as parsed:
            module.main(args[2:])
        namespace = parsed.value.args[0]
        # The variables the command sets reach the program (e.g. AMQP_URL as --amqp-url).
        for value in env.values():
            assert value in vars(namespace).values(), (env, namespace)


# --- Helm -----------------------------------------------------------------------------------


def helm_installs() -> list[list[str]]:
    return [words(c) for c in of_kind("helm")]


def parse_helm(args: list[str]) -> tuple[str, Path, str, dict[str, Any]]:
    """(release, chart dir, namespace, values) of `helm install|upgrade NAME CHART ...`."""
    assert args[0] == "helm"
    assert args[1] in ("install", "upgrade", "template"), args
    positional: list[str] = []
    namespace, sets, files = "default", [], []
    rest = iter(args[2:])
    for arg in rest:
        if arg in ("-n", "--namespace"):
            namespace = next(rest)
        elif arg == "--set":
            sets.append(next(rest))
        elif arg in ("-f", "--values"):
            files.append(next(rest))
        elif arg.startswith("-"):
            pytest.fail(f"the README's helm command uses {arg}, which this test does not model")
        else:
            positional.append(arg)
    release, chart_path = positional
    values: dict[str, Any] = {}
    for path in files:
        values.update(yaml.safe_load((ROOT / path).read_text()))
    if sets:
        # Helm parses every --set into one map, as one comma-joined expression would.
        values = {**values, **helm.parse_set_string(",".join(sets))}
    return release, ROOT / chart_path, namespace, values


def test_the_readme_has_a_helm_command() -> None:
    assert helm_installs()


@pytest.mark.parametrize("args", helm_installs(), ids=lambda a: " ".join(a[:3]))
def test_helm_command_renders_lints_and_validates(args: list[str]) -> None:
    release, chart_dir, namespace, values = parse_helm(args)
    report = helm.lint(chart_dir, values, strict=True, namespace=namespace)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    with helm.Chart.load(chart_dir) as chart:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs = [
        doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    kinds = {doc["kind"]: doc for doc in docs}
    # What the command asks for is what comes out.
    if values.get("ingress", {}).get("enabled"):
        host = kinds["Ingress"]["spec"]["rules"][0]["host"]
        config = kinds["ConfigMap"]["data"]
        assert config["BRIDGE_PUBLIC_URL"] == f"https://{host}"
    if "existingSecret" in values:
        assert "Secret" not in kinds
    notes = next(t for p, t in rendered.items() if p.endswith("NOTES.txt"))
    assert "/bitrix24/events" in notes


# --- kubectl (the backup) -------------------------------------------------------------------


def kubectl_commands() -> list[list[str]]:
    result = []
    for command in of_kind("kubectl", "(umask"):
        text = re.sub(r"^\(umask 0?77;\s*", "", command).rstrip(")")
        text = text.split(" > ", 1)[0]  # the local redirection of `cat`
        result.append(words(text))
    return result


def test_kubectl_commands_name_the_release_the_helm_command_installs() -> None:
    (install,) = helm_installs()
    release, chart_dir, namespace, values = parse_helm(install)
    with helm.Chart.load(chart_dir) as chart:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    deployment = next(
        doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "Deployment"
    )
    commands = kubectl_commands()
    assert commands
    for args in commands:
        assert args[:3] == ["kubectl", "-n", namespace], args
        assert args[3] == "exec", args
        assert args[4] == f"deploy/{deployment['metadata']['name']}", args
        inner = args[args.index("--") + 1 :]
        assert inner[0] in ("bitrix24-bridge", "cat", "rm"), inner
        if inner[0] == "bitrix24-bridge":
            parsed = cli._parser().parse_args(inner[1:])
            assert parsed.command == "backup"
            # The image's writable /tmp (an emptyDir); the root filesystem is read-only.
            assert parsed.path.startswith("/tmp/")


async def test_the_backup_command_runs_as_written(tmp_path: Path) -> None:
    from tests.state.test_backup import make_state

    (backup,) = [a[a.index("--") + 1 :] for a in kubectl_commands() if "backup" in a]
    live = tmp_path / "state.sqlite3"
    await make_state(live)
    target = tmp_path / Path(backup[-1]).name  # the same command, into this test's directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", *backup[1:-1], str(target)],
        env={**env, "BRIDGE_STATE_PATH": str(live)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes()[:16] == b"SQLite format 3\x00"


# --- the bridge's own command lines ---------------------------------------------------------


def bridge_command_lines() -> list[list[str]]:
    lines = []
    for command in inline("bitrix24-bridge "):
        # Synopses: [--opt] is optional (taken), a\|b a choice (the first), PATH a placeholder.
        text = re.sub(r"\[([^\]]+)\]", r"\1", command)
        text = re.sub(r"(\S+?)\\\|\S+", r"\1", text)
        lines.append(["x.sqlite3" if w == "PATH" else w for w in words(text)])
    return lines


@pytest.mark.parametrize("args", bridge_command_lines(), ids=" ".join)
def test_bridge_command_lines_parse(args: list[str]) -> None:
    assert args[0] == "bitrix24-bridge"
    command = args[1]
    if command in cli.OWN_PARSERS:
        parser = emulator_cli.build_parser() if command == "emulator" else None
        if parser is None:
            from bridge import demo

            parser = demo._parser()
        rest = args[2:]
    else:
        parser, rest = cli._parser(), args[1:]
    if "--help" in rest:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(rest)
        assert exited.value.code == 0
        return
    parser.parse_args(rest)


def test_the_key_generation_command_prints_a_fernet_key() -> None:
    (command,) = inline("python -c ")
    proc = subprocess.run(
        [sys.executable, *words(command)[1:]], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    Fernet(proc.stdout.strip().encode())  # raises unless it is a valid key


# --- the emulator's control API, with curl -------------------------------------------------


@pytest.fixture
def readme_emulator() -> Iterator[tuple[int, str]]:
    """The emulator started by the README's own command line, on a free port instead of 8090."""
    (command,) = [c for c in inline("bitrix24-bridge emulator --port") if "--handler" in c]
    port = free_port()
    args = words(command.replace("8090", str(port)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", *args[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                httpx.get(f"http://127.0.0.1:{port}/_emulator/queue", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.1)
        yield port, str(port)
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_curl_commands_work_against_the_emulator(readme_emulator: tuple[int, str]) -> None:
    port, _ = readme_emulator
    commands = of_kind("curl")
    assert len(commands) >= 4
    answers = []
    for command in commands:
        args = words(command.replace("localhost:8090", f"127.0.0.1:{port}"))
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, (command, proc.stderr)
        answers.append(json.loads(proc.stdout))
    app = answers[0]
    assert {"client_id", "client_secret", "refresh_token", "member_id"} <= set(app)
    # The event the README adds is queued (the emulator queues only events bound offline).
    assert any(a.get("added") == 1 for a in answers), answers
    assert any("free" in a and "reserved" in a for a in answers), answers


# --- scripts and the benchmark -----------------------------------------------------------------


SCRIPTS = sorted({words(c)[0] for c in fenced_commands() if c.startswith("./scripts/")})


def test_scripts_exist_and_parse() -> None:
    assert "./scripts/test.sh" in SCRIPTS
    for script_name in SCRIPTS:
        check_script(script_name)


def check_script(first: str) -> None:
    script = ROOT / first
    assert script.is_file()
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_benchmark_command_lines_parse() -> None:
    commands = [words(c) for c in of_kind(".venv/bin/python")]
    assert commands
    for args in commands:
        assert args[1] == "-m", args
        if args[2] == "bench":
            parsed = bench_args(args[3:])
            assert parsed.names
        else:
            proc = subprocess.run(
                [sys.executable, "-m", args[2], *args[3:], "--help"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr
