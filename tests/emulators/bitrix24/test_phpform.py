"""The emulator's ``parse_str`` and ``http_build_query`` against what a real PHP answers.

PHP's own answers come from two places: ``php_vectors.json`` beside this module (written by
``php`` itself, see ``php.py``) always, and a ``php`` run at test time over the same inputs plus
a few hundred generated ones when ``php`` is installed (``scripts/setup.sh`` installs
``php-cli``).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from bridge.emulators.bitrix24.phpform import (
    MAX_DEPTH,
    MAX_VARS,
    http_build_query,
    parse_str,
    php_array,
)
from tests.emulators.bitrix24.php import FIXED, committed, inputs_of, needs_php, php_answers

# Characters that decide how PHP reads a query string, and a few that do not.
_ALPHABET = [
    "a",
    "b",
    "0",
    "1",
    "-",
    ".",
    " ",
    "+",
    "[",
    "]",
    "[]",
    "=",
    "&",
    "%5B",
    "%5D",
    "%2",
    "%00",
    "%C3%A9",
    "x",
]


def generated(count: int, seed: int = 12) -> list[str]:
    chance = random.Random(seed)
    return ["".join(chance.choices(_ALPHABET, k=chance.randint(1, 14))) for _ in range(count)]


def as_php_json(decoded: dict[str, Any]) -> Any:
    """How ``json_encode`` prints a parse_str result: the top level too may be a list."""
    return php_array(decoded)


def test_committed_answers_of_php() -> None:
    vectors = committed()
    assert len(vectors["parse_str"]) == len(FIXED["parse_str"])
    for query, expected in vectors["parse_str"]:
        assert as_php_json(parse_str(query)) == expected, query
    for params, expected in vectors["http_build_query"]:
        assert http_build_query(params) == expected


@needs_php
def test_the_committed_answers_are_what_php_says() -> None:
    vectors = committed()
    assert php_answers(inputs_of(vectors)) == vectors
    assert inputs_of(vectors) == inputs_of(php_answers(FIXED))  # the file covers every input


@needs_php
def test_parse_str_agrees_with_php_on_generated_queries() -> None:
    queries = generated(400)
    answers = php_answers({"parse_str": queries, "http_build_query": [], "json": []})
    differing = [
        (query, expected, as_php_json(parse_str(query)))
        for query, expected in answers["parse_str"]
        if as_php_json(parse_str(query)) != expected
    ]
    assert differing == []


@needs_php
def test_http_build_query_agrees_with_php() -> None:
    params = [{"k": {str(i): text, "n": i}} for i, text in enumerate(generated(50, seed=3))]
    answers = php_answers({"parse_str": [], "http_build_query": params, "json": []})
    for sent, expected in answers["http_build_query"]:
        assert http_build_query(sent) == expected
        assert parse_str(expected) == {k: _as_text(v) for k, v in sent.items()}


def _as_text(value: Any) -> Any:
    if isinstance(value, dict):
        return php_array({k: _as_text(v) for k, v in value.items()})
    return str(value)


def test_depth_beyond_phps_limit_drops_the_variable() -> None:
    assert parse_str("a" + "[b]" * MAX_DEPTH + "=1&c=2") != {"c": "2"}
    # PHP deletes the whole variable, including what earlier pairs put in it.
    assert parse_str("a[x]=1&a" + "[b]" * (MAX_DEPTH + 1) + "=1&c=2") == {"c": "2"}


def test_too_many_variables_are_refused() -> None:
    assert len(parse_str("&".join(f"k{i}=1" for i in range(MAX_VARS)))) == MAX_VARS
    with pytest.raises(ValueError, match="variables"):
        parse_str("&".join(f"k{i}=1" for i in range(MAX_VARS + 1)))


def test_bytes_and_text_read_alike() -> None:
    query = "auth[member_id]=m%C3%A9&x=%FF"
    assert (
        parse_str(query.encode())
        == parse_str(query)
        == {
            "auth": {"member_id": "mé"},
            "x": "\ufffd",  # not UTF-8: replaced, never an exception
        }
    )
