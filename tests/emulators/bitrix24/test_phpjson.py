"""``Json::encode`` and ``MESSAGE_ID`` byte for byte, against what a real PHP answers."""

from __future__ import annotations

import random
from typing import Any

from bridge.emulators.bitrix24.phpjson import encode, message_id, php_value
from tests.emulators.bitrix24.php import FIXED, committed, needs_php, php_answers


def test_committed_answers_of_php() -> None:
    vectors = committed()["json"]
    assert len(vectors) == len(FIXED["json"])
    for name, data, encoded, md5 in vectors:
        assert encode(php_value(data)) == encoded
        assert message_id(name, php_value(data)) == md5


def test_mappings_with_list_keys_are_lists_as_in_php() -> None:
    # The control API receives JSON; PHP would hold {"0": .., "1": ..} as a list.
    assert php_value({"0": "a", "1": {"0": "b"}}) == ["a", ["b"]]
    assert encode(php_value({"1": "a"})) == '{"1":"a"}'
    assert encode(php_value({})) == "[]"


def test_message_id_depends_on_name_and_data() -> None:
    lead = {"FIELDS": {"ID": "7"}}
    assert message_id("ONCRMLEADADD", lead) == message_id("ONCRMLEADADD", {"FIELDS": {"ID": "7"}})
    assert message_id("ONCRMLEADADD", lead) != message_id("ONCRMLEADUPDATE", lead)
    assert message_id("ONCRMLEADADD", lead) != message_id("ONCRMLEADADD", {"FIELDS": {"ID": 7}})


_CHARACTERS = ["a", "/", "<", ">", "&", "'", '"', "\\", "é", "\u2028", "\n", "\x01"]


def _random_value(chance: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "map"] if depth < 3 else [])
    kind = chance.choice(kinds)
    if kind == "str":
        return "".join(chance.choices(_CHARACTERS, k=chance.randint(0, 6)))
    if kind == "int":
        return chance.randint(-(10**12), 10**12)
    if kind == "float":
        return chance.choice([1.0, 0.1, 2.5e-7, 3e21, -12.75, 1e16, 123456.0, chance.random()])
    if kind in ("bool", "null"):
        return chance.choice([True, False]) if kind == "bool" else None
    size = chance.randint(0, 3)
    if kind == "list":
        return [_random_value(chance, depth + 1) for _ in range(size)]
    keys = chance.sample(["0", "1", "2", "ID", "x/y", "<k>"], size)
    return {key: _random_value(chance, depth + 1) for key in keys}


@needs_php
def test_encode_agrees_with_php_on_generated_data() -> None:
    chance = random.Random(7)
    cases = [(f"EV{i}", {"FIELDS": _random_value(chance)}) for i in range(300)]
    answers = php_answers({"parse_str": [], "http_build_query": [], "json": cases})
    for (name, original), (_, _, encoded, md5) in zip(cases, answers["json"], strict=True):
        assert encode(php_value(original)) == encoded, original
        assert message_id(name, php_value(original)) == md5
