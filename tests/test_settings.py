import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from bridge.core.errors import ConfigError
from bridge.settings import load_settings


def test_defaults_match_the_contract() -> None:
    s = load_settings({})
    assert s.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert (s.http_host, s.http_port) == ("0.0.0.0", 8080)
    assert s.oauth_url == "https://oauth.bitrix.info"
    assert (s.page_size, s.poll_interval, s.rate_limit, s.rate_burst) == (50, 30, 2, 50)
    assert s.exchange_template == "bitrix24.{event}"
    assert s.routing_key_template == "{domain}"
    assert s.unrouted_exchange == "bitrix24.unrouted"
    assert s.declare is True
    assert (s.log_level, s.log_format) == ("INFO", "json")


def test_lists_are_comma_separated() -> None:
    s = load_settings(
        {"BRIDGE_EVENTS": "ONCRMLEADADD, ONCRMDEALUPDATE,,", "BRIDGE_ALLOWED_DOMAINS": "a.b"}
    )
    assert s.events == ("ONCRMLEADADD", "ONCRMDEALUPDATE")
    assert s.allowed_domains == ("a.b",)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_HTTP_PORT": "eighty"}, "BRIDGE_HTTP_PORT"),
        ({"BRIDGE_HTTP_PORT": "70000"}, "BRIDGE_HTTP_PORT"),
        ({"BRIDGE_AMQP_URL": "http://guest:hunter2@broker/"}, "BRIDGE_AMQP_URL"),
        ({"BRIDGE_OAUTH_URL": "oauth.bitrix.info"}, "BRIDGE_OAUTH_URL"),
        ({"BRIDGE_PAGE_SIZE": "0"}, "BRIDGE_PAGE_SIZE"),
        ({"BRIDGE_STATE_KEY": "not-a-key"}, "BRIDGE_STATE_KEY"),
        ({"BRIDGE_EXCHANGE_TEMPLATE": "x.{nope}"}, "BRIDGE_EXCHANGE_TEMPLATE"),
        ({"BRIDGE_LOG_FORMAT": "xml"}, "BRIDGE_LOG_FORMAT"),
        ({"BRIDGE_PORTAL_URL": "https://acme.bitrix24.ru"}, "BRIDGE_REFRESH_TOKEN"),
    ],
)
def test_a_bad_variable_is_named_in_one_line(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message
    assert "hunter2" not in message


def test_secrets_do_not_show_in_repr() -> None:
    key = Fernet.generate_key().decode()
    s = load_settings(
        {
            "BRIDGE_CLIENT_SECRET": "s3cret-value",
            "BRIDGE_AMQP_URL": "amqp://u:pw-value@h/",
            "BRIDGE_STATE_KEY": key,
        }
    )
    text = repr(s) + str(s)
    for secret in ("s3cret-value", "pw-value", key):
        assert secret not in text


def test_rotated_keys_are_all_accepted() -> None:
    keys = [Fernet.generate_key().decode() for _ in range(2)]
    s = load_settings({"BRIDGE_STATE_KEY": ",".join(keys)})
    assert s.state_keys == [k.encode() for k in keys]


def test_credentials_required_for_serving() -> None:
    with pytest.raises(ConfigError, match="BRIDGE_CLIENT_ID"):
        load_settings({}).require_credentials()


@pytest.mark.parametrize("command", ["serve", "drain"])
def test_commands_fail_with_one_line_not_a_traceback(command: str, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "BRIDGE_HTTP_PORT": "not-a-port"}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "BRIDGE_HTTP_PORT" in lines[0]


def test_missing_credentials_fail_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2
    expected = "error: BRIDGE_CLIENT_ID is required (the Bitrix24 application's client id)"
    assert proc.stderr.strip().splitlines() == [f"bitrix24-bridge: {expected}"]


@pytest.mark.parametrize("url", ["http://bridge:8080", "https://localhost", "http://b24-bridge/x"])
def test_a_handler_url_whose_host_has_no_dot_is_refused(url: str) -> None:
    # A portal answers ERROR_WRONG_HANDLER_URL for it (HandlerHelper::checkCallback).
    with pytest.raises(ConfigError, match=r"BRIDGE_PUBLIC_URL.*no dot"):
        load_settings({"BRIDGE_PUBLIC_URL": url})


def test_a_dotted_handler_host_is_accepted() -> None:
    assert load_settings({"BRIDGE_PUBLIC_URL": "https://b24.example.com"}).public_url
    assert load_settings({"BRIDGE_PUBLIC_URL": "http://127.0.0.1:8080"}).public_url


def test_operating_limit_and_poison_attempts() -> None:
    settings = load_settings({})
    assert settings.operating_limit == 420
    assert settings.poison_attempts == 5
    with pytest.raises(ConfigError, match="BRIDGE_POISON_ATTEMPTS"):
        load_settings({"BRIDGE_POISON_ATTEMPTS": "0"})


def test_scaled_mode_settings() -> None:
    s = load_settings({})
    assert (s.state_url, s.shards, s.lease_ttl, s.lease_renew) == (None, 64, 10, 2)
    s = load_settings(
        {
            "BRIDGE_STATE_URL": "postgresql://bridge:hunter2@db.example:5432/bridge",
            "BRIDGE_SHARDS": "1",
            "BRIDGE_LEASE_TTL": "5",
            "BRIDGE_LEASE_RENEW": "1",
        }
    )
    assert s.state_url is not None
    assert s.state_url.get_secret_value().endswith("/bridge")
    assert (s.shards, s.lease_ttl, s.lease_renew) == (1, 5, 1)
    assert "hunter2" not in repr(s)
    assert load_settings({"BRIDGE_STATE_URL": " "}).state_url is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BRIDGE_STATE_URL": "mysql://bridge:hunter2@db/bridge"}, "BRIDGE_STATE_URL"),
        ({"BRIDGE_SHARDS": "0"}, "BRIDGE_SHARDS"),
        ({"BRIDGE_SHARDS": "many"}, "BRIDGE_SHARDS"),
        ({"BRIDGE_LEASE_TTL": "2", "BRIDGE_LEASE_RENEW": "2"}, "BRIDGE_LEASE_RENEW"),
    ],
)
def test_bad_scaled_mode_settings_are_one_line_without_secrets(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert named in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "\n" not in str(caught.value)
