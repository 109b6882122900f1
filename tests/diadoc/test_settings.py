from __future__ import annotations

import pytest

from bridge.core.errors import ConfigError
from bridge.diadoc.settings import load_diadoc_settings

CREDS = {
    "BRIDGE_DIADOC_CLIENT_ID": "client",
    "BRIDGE_DIADOC_CLIENT_SECRET": "very-secret-value",
    "BRIDGE_DIADOC_REFRESH_TOKEN": "refresh-secret-value",
}


def test_disabled_without_boxes() -> None:
    settings = load_diadoc_settings({})
    assert not settings.enabled
    assert settings.boxes == ()


def test_defaults_and_comma_list() -> None:
    settings = load_diadoc_settings({**CREDS, "BRIDGE_DIADOC_BOXES": " a-1 , b-2,, "})
    assert settings.enabled
    assert settings.boxes == ("a-1", "b-2")
    assert settings.rescan_window == 86_400  # a day, read every half hour: the re-scan is cheap
    assert settings.rescan_interval == 1800
    assert settings.api_version == "V5"
    assert settings.department_id is None
    assert settings.page_limit == 100
    assert settings.exchange == "diadoc.events"
    assert settings.token_url == "https://identity.kontur.ru/connect/token"


def test_secrets_stay_out_of_repr() -> None:
    settings = load_diadoc_settings({**CREDS, "BRIDGE_DIADOC_BOXES": "a"})
    text = repr(settings) + str(settings.model_dump())
    assert "very-secret-value" not in text
    assert "refresh-secret-value" not in text


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BRIDGE_DIADOC_BOXES": "a"}, "BRIDGE_DIADOC_CLIENT_ID"),
        (
            {"BRIDGE_DIADOC_BOXES": "a", "BRIDGE_DIADOC_CLIENT_ID": "c"},
            "BRIDGE_DIADOC_CLIENT_SECRET",
        ),
        ({**CREDS, "BRIDGE_DIADOC_BOXES": "a", "BRIDGE_DIADOC_PAGE_LIMIT": "101"}, "PAGE_LIMIT"),
        ({**CREDS, "BRIDGE_DIADOC_BOXES": "a", "BRIDGE_DIADOC_API_URL": "ftp://x"}, "API_URL"),
        ({**CREDS, "BRIDGE_DIADOC_BOXES": "a,a"}, "BRIDGE_DIADOC_BOXES"),
        ({**CREDS, "BRIDGE_DIADOC_POLL_INTERVAL": "soon"}, "POLL_INTERVAL"),
        ({**CREDS, "BRIDGE_DIADOC_API_VERSION": "V2"}, "BRIDGE_DIADOC_API_VERSION"),
        ({**CREDS, "BRIDGE_DIADOC_API_VERSION": "latest"}, "BRIDGE_DIADOC_API_VERSION"),
        ({**CREDS, "BRIDGE_DIADOC_DEPARTMENT_ID": "a b"}, "BRIDGE_DIADOC_DEPARTMENT_ID"),
        (
            {**CREDS, "BRIDGE_DIADOC_BOXES": "a,b", "BRIDGE_DIADOC_DEPARTMENT_ID": "d"},
            "BRIDGE_DIADOC_DEPARTMENT_ID",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_diadoc_settings(env)
    message = str(info.value)
    assert variable in message
    assert "\n" not in message
    assert "very-secret-value" not in message


def test_plain_http_warning_only_off_loopback() -> None:
    local = load_diadoc_settings(
        {**CREDS, "BRIDGE_DIADOC_BOXES": "a", "BRIDGE_DIADOC_API_URL": "http://127.0.0.1:9"}
    )
    assert local.plain_http_urls() == []
    remote = load_diadoc_settings(
        {**CREDS, "BRIDGE_DIADOC_BOXES": "a", "BRIDGE_DIADOC_TOKEN_URL": "http://idp.example"}
    )
    assert remote.plain_http_urls() == ["BRIDGE_DIADOC_TOKEN_URL"]


@pytest.mark.parametrize(("given", "version"), [("5", "V5"), ("v4", "V4"), (" V3 ", "V3")])
def test_api_version_is_normalised(given: str, version: str) -> None:
    settings = load_diadoc_settings({**CREDS, "BRIDGE_DIADOC_API_VERSION": given})
    assert settings.api_version == version


def test_department_id_for_one_box() -> None:
    env = {**CREDS, "BRIDGE_DIADOC_BOXES": "a", "BRIDGE_DIADOC_DEPARTMENT_ID": " dep-1 "}
    assert load_diadoc_settings(env).department_id == "dep-1"
    empty = {**env, "BRIDGE_DIADOC_DEPARTMENT_ID": ""}
    assert load_diadoc_settings(empty).department_id is None
