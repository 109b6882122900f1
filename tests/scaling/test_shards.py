"""Portal → shard hashing and the fair share of shards per replica."""

import random
import zlib

import pytest

from bridge.scaling.shards import fair_target, shard_of


def test_shard_of_is_crc32_of_the_member_id_and_stable() -> None:
    # Fixed values: a change of hash would move every portal to another owner.
    assert shard_of("abc", 64) == 2
    assert zlib.crc32(b"abc") == 891568578
    assert shard_of("abc", 1) == 0
    with pytest.raises(ValueError, match="at least 1"):
        shard_of("abc", 0)


def test_member_ids_spread_over_every_shard() -> None:
    rng = random.Random(7)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(2000)]
    counts = [0] * 64
    for member_id in ids:
        counts[shard_of(member_id, 64)] += 1
    assert min(counts) > 0
    assert max(counts) < 3 * 2000 / 64


@pytest.mark.parametrize(
    ("shards", "others", "mine", "free", "target"),
    [
        (64, {}, 0, 64, 64),  # alone: everything
        (64, {"b": 0}, 64, 0, 32),  # a newcomer with nothing: hand half over
        (64, {"b": 22, "c": 20}, 22, 0, 21),  # c is short and nothing is free: give one
        (64, {"b": 21, "c": 20}, 21, 2, 22),  # c can fill its gap from free ones: take a spare
        (64, {"b": 21, "c": 21}, 21, 1, 22),
        (64, {"b": 22, "c": 21}, 21, 0, 21),  # even already: keep
        (1, {"b": 1}, 0, 0, 0),  # standby back from a partition does not take the shard back
        (1, {"b": 0}, 1, 0, 1),
        (8, {"b": 4, "c": 0}, 4, 0, 2),
    ],
)
def test_fair_target(
    shards: int, others: dict[str, int], mine: int, free: int, target: int
) -> None:
    assert fair_target(shards, others, mine, free) == target


def test_rounds_of_fair_targets_converge_within_one() -> None:
    # Replicas acting one at a time, as their ticks interleave, from the worst start.
    rng = random.Random(3)
    for replicas in range(1, 7):
        held = {f"r{i}": 0 for i in range(replicas)}
        held["r0"] = 64
        for _ in range(200):
            me = rng.choice(list(held))
            others = {k: v for k, v in held.items() if k != me}
            free = 64 - sum(held.values())
            target = fair_target(64, others, held[me], free)
            held[me] = target if target < held[me] else min(target, held[me] + free)
        assert sum(held.values()) == 64
        assert max(held.values()) - min(held.values()) <= 1, held
