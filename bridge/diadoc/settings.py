"""Configuration of the Diadoc source: ``BRIDGE_DIADOC_*`` environment variables.

The source is off unless ``BRIDGE_DIADOC_BOXES`` names at least one box; then the OpenID Connect
credentials become required.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bridge.core.errors import ConfigError
from bridge.settings import CommaList, _split_commas, is_loopback

PREFIX = "BRIDGE_DIADOC_"


class DiadocSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=".env",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    api_url: str = "https://diadoc-api.kontur.ru"
    token_url: str = "https://identity.kontur.ru/connect/token"  # noqa: S105 (a URL)
    client_id: str | None = None
    client_secret: SecretStr | None = None
    # Used only until the first refresh: refresh tokens rotate, the live one is kept in state.
    refresh_token: SecretStr | None = None
    boxes: CommaList = ()

    # GetDocflowEvents version: V5 is current; V3 and V4 read the same fields.
    api_version: str = "V5"
    # For an account that sees only one department of its organisation (else 403).
    department_id: str | None = None
    poll_interval: float = Field(default=30, gt=0)
    # The late-event re-scan reads bare events, so a day-long window stays cheap.
    rescan_window: float = Field(default=86_400, ge=0)
    rescan_interval: float = Field(default=1800, gt=0)
    # Where a box seen for the first time starts reading, in seconds before now.
    start_lookback: float = Field(default=3600, ge=0)
    page_limit: int = Field(default=100, ge=1, le=100)
    seen_keep: int = Field(default=100_000, ge=1000)
    populate_documents: bool = True
    exchange: str = Field(default="diadoc.events", min_length=1)
    request_timeout: float = Field(default=30, gt=0)

    @field_validator("boxes", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("boxes")
    @classmethod
    def _box_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for box in value:
            if any(c.isspace() or c in "#*/?&" for c in box):
                raise ValueError(f"box id {box!r} has characters a box id never has")
        if len(set(value)) != len(value):
            raise ValueError("a box is listed twice")
        return value

    @field_validator("api_version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        text = str(value).strip().upper().removeprefix("V")
        if not text.isdigit() or int(text) < 3:
            raise ValueError("must be V3 or later, e.g. V5 (older versions lack FullVersion)")
        return f"V{int(text)}"

    @field_validator("department_id", mode="before")
    @classmethod
    def _department(cls, value: object) -> object:
        if value is None or not str(value).strip():
            return None
        text = str(value).strip()
        if any(c.isspace() or c in "#*/?&," for c in text):
            raise ValueError(f"department id {text!r} has characters a department id never has")
        return text

    @field_validator("api_url", "token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _credentials(self) -> DiadocSettings:
        if not self.enabled:
            return self
        if not self.client_id:
            raise ValueError("client_id: required when BRIDGE_DIADOC_BOXES is set")
        if self.client_secret is None or not self.client_secret.get_secret_value():
            raise ValueError("client_secret: required when BRIDGE_DIADOC_BOXES is set")
        if self.department_id is not None and len(self.boxes) > 1:
            raise ValueError(
                "department_id: a department belongs to one organisation; list one box with it"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.boxes)

    def plain_http_urls(self) -> list[str]:
        """Variables whose URL sends tokens unencrypted to a non-loopback host."""
        return [
            PREFIX + name.upper()
            for name, url in (("api_url", self.api_url), ("token_url", self.token_url))
            if url.startswith("http://") and not is_loopback(url)
        ]


def load_diadoc_settings(env: dict[str, str] | None = None) -> DiadocSettings:
    """Settings from the environment (or ``env``); a bad value is one :class:`ConfigError` line."""
    try:
        if env is None:
            return DiadocSettings()
        values: dict[str, Any] = {
            k[len(PREFIX) :].lower(): v for k, v in env.items() if k.startswith(PREFIX)
        }
        # Only ``env`` counts here: no .env file, no process environment.
        return DiadocSettings(**{"_env_file": None, **values})
    except ValidationError as exc:
        raise ConfigError(_describe_diadoc(exc)) from None


def _describe_diadoc(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = first.get("loc") or ()
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    field = str(loc[0]) if loc else ""
    if not field and ": " in message:
        # A model-level check names its field in front of the message.
        field, message = message.split(": ", 1)
    name = f"{PREFIX}{field.upper()}" if field else "Diadoc configuration"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"invalid {name}: {message}{suffix}"
