"""The run's seed: fresh unless ``BRIDGE_TEST_SEED`` names one, and the same seed replays."""

from __future__ import annotations

import pytest

from tests.seeds import VARIABLE, generator, run_seed


def test_a_named_seed_replays_every_draw() -> None:
    seed = run_seed({VARIABLE: " 1234 "})
    assert seed == 1234
    first = generator(seed, "tests/x.py::test_y")
    again = generator(seed, "tests/x.py::test_y")
    assert [first.random() for _ in range(5)] == [again.random() for _ in range(5)]


def test_each_test_draws_its_own_sequence() -> None:
    one = generator(1234, "tests/x.py::test_y")
    other = generator(1234, "tests/x.py::test_z")
    assert [one.random() for _ in range(5)] != [other.random() for _ in range(5)]


def test_without_a_named_seed_runs_differ() -> None:
    assert len({run_seed({}) for _ in range(5)}) > 1


def test_a_seed_that_is_no_integer_is_refused_by_name() -> None:
    with pytest.raises(pytest.UsageError, match=VARIABLE):
        run_seed({VARIABLE: "twelve"})


DRAWING_TEST = """
def test_draws(rng):
    print("draws", [rng.randrange(10**6) for _ in range(3)])
    assert False
"""


def test_a_failed_test_that_drew_names_the_seed_and_the_seed_replays_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_drawing=DRAWING_TEST)
    monkeypatch.setenv(VARIABLE, "77")
    options = ("-p", "tests.seeds", "-p", "no:cacheprovider", "-p", "no:asyncio")
    runs = [pytester.runpytest_inprocess(*options) for _ in range(2)]
    draws = []
    for run in runs:
        run.assert_outcomes(failed=1)
        output = run.stdout.str()
        assert f"replay this test's draws with {VARIABLE}=77" in output
        draws.append([line for line in output.splitlines() if line.startswith("draws")])
    assert draws[0] == draws[1] != []
