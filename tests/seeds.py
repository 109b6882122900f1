"""Seeded randomness: one seed a run, printed, and ``BRIDGE_TEST_SEED`` to replay it.

A test that draws anything takes the ``rng`` fixture, a ``random.Random`` seeded from the run's
seed and the test's id: ``BRIDGE_TEST_SEED=<seed> pytest <test id>`` replays its draws exactly.
The seed is in the report header and in the report of every failed test that drew. Unset, each
run draws a fresh seed, so the kill and fault schedules keep exploring.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Generator

import pytest

VARIABLE = "BRIDGE_TEST_SEED"
_RUN_SEED = pytest.StashKey[int]()
_DREW = pytest.StashKey[int]()


def run_seed(environ: os._Environ[str] | dict[str, str] = os.environ) -> int:
    """The run's seed: ``BRIDGE_TEST_SEED`` when set, a fresh one otherwise."""
    value = environ.get(VARIABLE, "").strip()
    if not value:
        return secrets.randbits(32)
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{VARIABLE} must be an integer, not {value!r}") from None


def generator(seed: int, test_id: str) -> random.Random:
    """The generator of one test: its draws depend on the run's seed and on nothing else."""
    return random.Random(f"{seed}:{test_id}")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RUN_SEED] = seed = run_seed()
    # Parallel workers (pytest-xdist) start after this and inherit the environment: one run, one
    # seed, the one in the header.
    os.environ[VARIABLE] = str(seed)


def pytest_report_header(config: pytest.Config) -> str:
    return f"random seed: {VARIABLE}={config.stash[_RUN_SEED]}"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    seed = request.config.stash[_RUN_SEED]
    request.node.stash[_DREW] = seed
    return generator(seed, request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    seed = item.stash.get(_DREW, None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"replay this test's draws with {VARIABLE}={seed}"))
    return report
