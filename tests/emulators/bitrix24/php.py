"""Reference answers from a real PHP, for the emulator's own PHP-compatible code.

``php_answers(inputs)`` runs the ``php`` found on PATH (Debian's ``php-cli``; ``scripts/setup.sh``
installs it) once over every input. ``php_vectors.json`` beside this module holds answers PHP
gave for a fixed set of inputs, so the comparison still runs where PHP is missing; rewrite it
with ``.venv/bin/python -m tests.emulators.bitrix24.php``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).with_name("php_vectors.json")

# Bitrix's Json::encode default options (main/lib/web/json.php) and the MESSAGE_ID formula
# (rest/lib/eventoffline.php, getMessageId), spelled out in PHP.
SCRIPT = r"""<?php
$in = json_decode(stream_get_contents(STDIN), true);
$bitrix = JSON_HEX_TAG | JSON_HEX_AMP | JSON_HEX_APOS | JSON_HEX_QUOT
    | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE;
$plain = JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE
    | JSON_PRESERVE_ZERO_FRACTION;
$out = ['parse_str' => [], 'http_build_query' => [], 'json' => []];
foreach ($in['parse_str'] as $query) {
    $result = [];
    parse_str($query, $result);
    $out['parse_str'][] = [$query, $result];
}
foreach ($in['http_build_query'] as $params) {
    $out['http_build_query'][] = [$params, http_build_query($params)];
}
foreach ($in['json'] as [$name, $data]) {
    $encoded = json_encode($data, $bitrix);
    $out['json'][] = [$name, $data, $encoded, md5($name . '|' . $encoded)];
}
echo json_encode($out, $plain);
"""


def php() -> str | None:
    return shutil.which("php")


needs_php = pytest.mark.skipif(php() is None, reason="no php here: apt-get install php-cli")


def php_answers(inputs: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """PHP's answers for ``{"parse_str": [...], "http_build_query": [...], "json": [...]}``."""
    binary = php()
    if binary is None:
        raise RuntimeError("php is not installed (apt-get install php-cli)")
    done = subprocess.run(
        [binary, "-d", "display_errors=stderr", "-r", SCRIPT.removeprefix("<?php")],
        input=json.dumps(inputs),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    answers: dict[str, list[Any]] = json.loads(done.stdout)
    return answers


def committed() -> dict[str, list[Any]]:
    vectors: dict[str, list[Any]] = json.loads(VECTORS.read_text(encoding="utf-8"))
    return vectors


def inputs_of(vectors: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {
        "parse_str": [query for query, _ in vectors["parse_str"]],
        "http_build_query": [params for params, _ in vectors["http_build_query"]],
        "json": [[name, data] for name, data, _, _ in vectors["json"]],
    }


# Inputs whose answers are committed: the quirks the emulator depends on, one or two each.
FIXED: dict[str, list[Any]] = {
    "parse_str": [
        "message_id[]=a&message_id[]=b",
        "message_id[0]=a&message_id[1]=b",
        "message_id%5B0%5D=a&message_id%5B1%5D=b",
        "a[1]=x&a[0]=y",
        "a[]=x&a[5]=y&a[]=z",
        "filter[%3E%3DID]=5",
        "filter[>=ID]=5",
        "a=1&a=2",
        "a=1&a[b]=2",
        "a[b]=2&a=1",
        "data=&ts=1",
        "flag",
        "a.b=1&c d=2",
        "a[=1",
        "a[b]c=1",
        "a[b][c=1",
        "q=%24result%5Bget%5D%5Bprocess_id%5D",
        "x=a+b%20c",
        "[a]=1&=2&&",
        "a[01]=x&a[-0]=y&a[-5]=z&a[]=w",
        "a[9223372036854775807]=x&a[]=y",
        " a=1&a%00b=2&c=%00d",
        "a[][x=1&b[][]=1&b[][]=2",
        "a.b[c.d]=1&a b[c d]=2&x[y.z[w]=3",
        "%=1&b=%zz&c=%4&d=%C3%A9",
        "auth[member_id]=m&auth[domain]=x.bitrix24.ru&auth_connector=c",
        "cmd[0]=app.info&cmd[1]=event.offline.get%3Fclear%3D0",
    ],
    "http_build_query": [
        {"event": "ONOFFLINEEVENT", "event_handler_id": 17, "ts": 1466439714},
        {"auth": {"domain": "a.bitrix24.ru", "client_endpoint": "https://a.bitrix24.ru/rest/"}},
        {"data": {"FIELDS": {"ID": 7}}, "list": ["x", "y"], "empty": [], "none": None},
        {"text": "a b&c=d~e/f", "yes": True, "no": False, "ru": "Привет"},
    ],
    "json": [
        ["ONCRMLEADADD", {"FIELDS": {"ID": "7405"}}],
        ["ONCRMLEADADD", {"FIELDS": {"ID": 7405}}],
        ["ONCRMDEALUPDATE", False],
        ["ONCRMDEALUPDATE", None],
        ["ONTASKADD", {"0": "a", "1": "b"}],
        ["ONTASKADD", {"1": "a"}],
        ["ONTASKADD", {}],
        ["E", {"t": "<a href='x'>&\"quoted\"</a> /path\\ \u2028 Привет \u00e9 \t\n\u0001"}],
        ["E", {"f": [1.0, 0.5, 1e16, 1e17, 1e-4, 1e-5, -2.5, 123456789012345678.0, -0.0]}],
        ["E", {"big": 9223372036854775807, "neg": -1, "nested": [[], {}, [{"a": None}]]}],
    ],
}


if __name__ == "__main__":
    answers = php_answers(FIXED)
    lines = [
        f"  {json.dumps(section)}: [\n"
        + ",\n".join(f"    {json.dumps(item, ensure_ascii=False)}" for item in items)
        + "\n  ]"
        for section, items in answers.items()
    ]
    VECTORS.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    print(f"wrote {VECTORS}")
