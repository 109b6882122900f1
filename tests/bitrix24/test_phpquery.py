"""PHP-style query strings, both ways, against PHP's own rules and hostile input."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.bitrix24.phpquery import decode, encode


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("message_id[]=a&message_id[]=b", {"message_id": ["a", "b"]}),
        ("message_id[0]=a&message_id[1]=b", {"message_id": ["a", "b"]}),
        ("message_id%5B0%5D=a&message_id%5B1%5D=b", {"message_id": ["a", "b"]}),
        ("a[1]=x&a[0]=y", {"a": {"1": "x", "0": "y"}}),
        ("a[]=x&a[5]=y&a[]=z", {"a": {"0": "x", "5": "y", "6": "z"}}),
        ("filter[%3E%3DID]=5", {"filter": {">=ID": "5"}}),
        ("filter[>%3DID]=5", {"filter": {">=ID": "5"}}),
        # PHP splits at the first "=", even inside brackets: keys must be URL-encoded.
        ("filter[>=ID]=5", {"filter_>": "ID]=5"}),
        ("a=1&a=2", {"a": "2"}),
        ("a=1&a[b]=2", {"a": {"b": "2"}}),
        ("a[b]=2&a=1", {"a": "1"}),
        (
            "auth[member_id]=m&auth[domain]=x.bitrix24.ru",
            {"auth": {"member_id": "m", "domain": "x.bitrix24.ru"}},
        ),
        ("data=&ts=1", {"data": "", "ts": "1"}),
        ("flag", {"flag": ""}),
        ("a.b=1&c d=2", {"a_b": "1", "c_d": "2"}),
        ("a[=1", {"a_": "1"}),
        ("a[b]c=1", {"a": {"b": "1"}}),
        ("a[b][c=1", {"a": {"b": "1"}}),
        ("q=%24result%5Bget%5D%5Bprocess_id%5D", {"q": "$result[get][process_id]"}),
        ("x=a+b%20c", {"x": "a b c"}),
        ("[a]=1&=2&&", {}),
        ("a[01]=x", {"a": {"01": "x"}}),
    ],
)
def test_decode_like_php(query: str, expected: dict[str, Any]) -> None:
    assert decode(query) == expected


def test_encode_like_http_build_query() -> None:
    params = {
        "process_id": "p",
        "message_id": ["a", "b"],
        "filter": {">=ID": 5},
        "clear": False,
        "halt": True,
        "none": None,
        "text": "a b&c=d",
    }
    assert encode(params) == (
        "process_id=p&message_id[0]=a&message_id[1]=b&filter[%3E%3DID]=5"
        "&clear=0&halt=1&text=a%20b%26c%3Dd"
    )
    assert decode(encode(params)) == {
        "process_id": "p",
        "message_id": ["a", "b"],
        "filter": {">=ID": "5"},
        "clear": "0",
        "halt": "1",
        "text": "a b&c=d",
    }


def test_limits() -> None:
    assert decode("a" + "[b]" * 16 + "=1")
    with pytest.raises(ValueError, match="deeper"):
        decode("a" + "[b]" * 17 + "=1")
    with pytest.raises(ValueError, match="keys"):
        decode("&".join(f"k{i}=1" for i in range(1001)))
    with pytest.raises(ValueError, match="codec"):
        decode(b"a=\xff\xfe")


_keys = st.text(alphabet="abcXYZ_-:>=<@!$*/?ё中", min_size=1, max_size=6)
_scalars = st.text(max_size=10) | st.integers().map(str)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(_keys, inner, min_size=1, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(_keys.filter(lambda k: not k.isdigit()), _values, max_size=4))
def test_round_trip(params: dict[str, Any]) -> None:
    assert decode(encode(params)) == params


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_hostile_input_only_raises_value_error(query: str | bytes) -> None:
    with contextlib.suppress(ValueError):
        decode(query, max_depth=4, max_keys=20)


@given(st.lists(st.sampled_from(["a", "[", "]", "=", "&", "%5B", "%", "0", "[]", ".", " "])))
def test_bracket_soup_only_raises_value_error(parts: list[str]) -> None:
    with contextlib.suppress(ValueError):
        decode("".join(parts), max_depth=3)
