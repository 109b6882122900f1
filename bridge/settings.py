"""Configuration: every setting comes from a ``BRIDGE_*`` environment variable."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bridge.core.errors import ConfigError

log = logging.getLogger(__name__)

CommaList = Annotated[tuple[str, ...], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _check_http_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an http(s) URL with a host")
    return value.rstrip("/")


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=1, le=65535)
    state_path: str = "./bridge-state.sqlite3"
    state_key: SecretStr | None = None
    state_url: SecretStr | None = None  # postgresql://...: scaled mode; unset: SQLite
    shards: int = Field(64, ge=1, le=100_000)
    lease_ttl: float = Field(10, gt=0)
    lease_renew: float = Field(2, gt=0)
    replica_id: str = Field("", max_length=100)  # empty: host name and process id

    client_id: str | None = None
    client_secret: SecretStr | None = None
    oauth_url: str = "https://oauth.bitrix.info"
    portal_url: str | None = None
    refresh_token: SecretStr | None = None
    application_token: SecretStr | None = None
    allowed_domains: CommaList = ()

    auth_connector: str = ""
    events: CommaList = ()
    public_url: str | None = None
    min_timeout: int = Field(1, ge=0)
    page_size: int = Field(50, ge=1, le=1000)
    poll_interval: float = Field(30, ge=0)
    rate_limit: float = Field(2, gt=0)
    rate_burst: int = Field(50, ge=1)

    exchange_template: str = "bitrix24.{event}"
    routing_key_template: str = "{domain}"
    unrouted_exchange: str = Field("bitrix24.unrouted", min_length=1)
    declare: bool = True
    confirm_timeout: float = Field(30, gt=0)

    operating_limit: float = Field(420, gt=0)
    poison_attempts: int = Field(5, ge=1)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("allowed_domains", "events", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("oauth_url", "portal_url", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url("the URL", value)

    @field_validator("public_url")
    @classmethod
    def _handler_host(cls, value: str | None) -> str | None:
        # A portal refuses a handler whose host has no dot (HandlerHelper::checkCallback):
        # http://bridge:8080 or http://localhost would fail at every install.
        host = urlsplit(value).hostname if value else None
        if host is not None and "." not in host:
            raise ValueError(
                f"Bitrix24 refuses a handler URL whose host has no dot ({host!r}); use the "
                "bridge's public name, e.g. https://b24-bridge.example.com"
            )
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError("must be an amqp:// or amqps:// URL with a host")
        return value

    @field_validator("state_url")
    @classmethod
    def _postgres(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if urlsplit(value.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("replica_id")
    @classmethod
    def _replica(cls, value: str) -> str:
        # It travels in a request header (X-Bridge-Replica) and in the lease rows.
        if not re.fullmatch(r"[A-Za-z0-9._:-]*", value):
            raise ValueError("use letters, digits and . _ : - only")
        return value

    @field_validator("exchange_template", "routing_key_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(event="e", domain="d", member_id="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError("unknown placeholder; use {event}, {domain}, {member_id}") from exc
        return value

    @field_validator("state_key")
    @classmethod
    def _fernet_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        from cryptography.fernet import Fernet

        for part in value.get_secret_value().split(","):
            try:
                Fernet(part.strip())
            except ValueError as exc:
                raise ValueError(
                    "must be Fernet keys (32 url-safe base64 bytes), comma-separated"
                ) from exc
        return value

    @model_validator(mode="after")
    def _lease_timing(self) -> Settings:
        if self.lease_renew >= self.lease_ttl:
            raise ValueError("BRIDGE_LEASE_RENEW must be shorter than BRIDGE_LEASE_TTL")
        return self

    @model_validator(mode="after")
    def _bootstrap_complete(self) -> Settings:
        given = [self.portal_url, self.refresh_token, self.application_token]
        if any(v is not None for v in given) and not all(v is not None for v in given):
            raise ValueError(
                "BRIDGE_PORTAL_URL, BRIDGE_REFRESH_TOKEN and BRIDGE_APPLICATION_TOKEN "
                "go together: set all three or none"
            )
        return self

    # -- derived values ---------------------------------------------------------------

    @property
    def replica_name(self) -> str:
        """This process among the replicas: ``BRIDGE_REPLICA_ID``, or host name and pid."""
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def state_keys(self) -> list[bytes]:
        if self.state_key is None:
            return []
        return [
            k.strip().encode() for k in self.state_key.get_secret_value().split(",") if k.strip()
        ]

    def require_credentials(self) -> tuple[str, str]:
        if not self.client_id:
            raise ConfigError("BRIDGE_CLIENT_ID is required (the Bitrix24 application's client id)")
        if self.client_secret is None or not self.client_secret.get_secret_value():
            raise ConfigError(
                "BRIDGE_CLIENT_SECRET is required (the Bitrix24 application's secret)"
            )
        return self.client_id, self.client_secret.get_secret_value()

    def warn_plain_http(self) -> None:
        for name, url in (
            ("BRIDGE_OAUTH_URL", self.oauth_url),
            ("BRIDGE_PORTAL_URL", self.portal_url),
        ):
            if url and url.startswith("http://") and not is_loopback(url):
                log.warning(
                    "%s uses plain http:// on a non-loopback host; tokens travel unencrypted", name
                )


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build settings from the environment (or ``env``), turning validation errors into one line."""
    try:
        if env is None:
            return Settings()
        return _settings_from(env)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _settings_from(env: dict[str, str]) -> Settings:
    values = {k[len("BRIDGE_") :].lower(): v for k, v in env.items() if k.startswith("BRIDGE_")}
    # model_validate skips the environment and .env sources: only ``env`` counts.
    return Settings.model_validate(values)


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = first.get("loc") or ()
    field = str(loc[0]) if loc else ""
    name = f"BRIDGE_{field.upper()}" if field else "configuration"
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"invalid {name}: {message}{suffix}"
