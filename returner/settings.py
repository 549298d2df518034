"""The one settings object: environment, `.env`, then CLI options (which win)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from returner.errors import SettingsError
from returner.s3config import DEFAULT_CACHE_CONTROL, AddressingStyle, ObjectStoreConfig, parse_url
from returner.task import ChannelOrder

Subsampling = Literal["444", "422", "420", "440", "411"]

# The renderer names its segments `img_shm_<hex>`; nothing else is opened by default.
DEFAULT_SHM_NAME_PATTERN = r"img_shm_[0-9a-fA-F]{1,128}"


def default_consumer_name() -> str:
    """Stable across restarts of the same host (and container hostname)."""
    return socket.gethostname() or "returner"


CONSOLE_TOKEN_MIN = 16  # characters; `openssl rand -hex 16` gives 32

_CASED = (
    "log_level",
    "jpeg_subsampling",
    "channel_order",
    "log_format",
    "output_layout",
    "segment_read",
)
_OPTIONAL = (
    "redis_url",
    "object_store_url",
    "s3_endpoint_url",
    "s3_region",
    "public_base_url",
    "success_queue",
    "error_queue",
    "console_token",
)


class Settings(BaseSettings):
    """Every setting of the service; see docs/reference/settings.md."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    hosting_tasks_queue: str = Field(
        default="hosting:tasks", alias="HOSTING_TASKS_QUEUE", min_length=1
    )
    output_dir: Path = Field(default=Path("./output/translated"), alias="OUTPUT_DIR")
    shm_name_pattern: str = Field(default=DEFAULT_SHM_NAME_PATTERN, alias="SHM_NAME_PATTERN")
    jpeg_quality: int = Field(default=80, ge=1, le=100, alias="JPEG_QUALITY")
    jpeg_subsampling: Subsampling = Field(default="420", alias="JPEG_SUBSAMPLING")
    channel_order: ChannelOrder = Field(default="RGB", alias="CHANNEL_ORDER")
    consumer_group: str = Field(default="returner", alias="CONSUMER_GROUP", min_length=1)
    consumer_name: str = Field(
        default_factory=default_consumer_name, alias="CONSUMER_NAME", min_length=1
    )
    claim_min_idle_ms: int = Field(default=60_000, ge=100, alias="CLAIM_MIN_IDLE_MS")
    consumer_timeout_ms: int = Field(default=10_000, ge=3_000, alias="CONSUMER_TIMEOUT_MS")
    stuck_after_ms: int = Field(default=120_000, ge=1_000, alias="STUCK_AFTER_MS")
    max_deliveries: int = Field(default=5, ge=1, alias="MAX_DELIVERIES")
    max_pixels: int = Field(default=100_000_000, ge=1, alias="MAX_PIXELS")
    segment_read: Literal["map", "copy"] = Field(default="map", alias="SEGMENT_READ")
    max_task_bytes: int = Field(default=65_536, ge=256, le=64 * 1024 * 1024, alias="MAX_TASK_BYTES")
    dead_letters_maxlen: int = Field(default=100_000, ge=1, alias="DEAD_LETTERS_MAXLEN")
    output_layout: Literal["flat", "daily"] = Field(default="flat", alias="OUTPUT_LAYOUT")
    results_json_entries: int = Field(
        default=1000, ge=0, le=1_000_000, alias="RESULTS_JSON_ENTRIES"
    )
    results_retention_days: int = Field(default=30, ge=0, alias="RESULTS_RETENTION_DAYS")
    events_maxlen: int = Field(default=100_000, ge=1, alias="EVENTS_MAXLEN")
    publish_events: bool = Field(default=False, alias="PUBLISH_EVENTS")
    metrics_host: str = Field(default="127.0.0.1", alias="METRICS_HOST")
    metrics_port: int = Field(default=9108, ge=0, le=65535, alias="METRICS_PORT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", alias="LOG_LEVEL"
    )
    log_format: Literal["text", "json"] = Field(default="text", alias="LOG_FORMAT")
    encoder_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, le=256, alias="ENCODER_THREADS"
    )
    batch_size: int = Field(default=32, ge=1, le=1000, alias="BATCH_SIZE")
    workers: int = Field(default=1, ge=1, le=256, alias="WORKERS")
    # None: ask the server (`INFO cluster`) at start.
    redis_cluster: bool | None = Field(default=None, alias="REDIS_CLUSTER")
    redis_wait_replicas: int = Field(default=0, ge=0, le=16, alias="REDIS_WAIT_REPLICAS")
    redis_wait_timeout_ms: int = Field(default=1_000, ge=1, alias="REDIS_WAIT_TIMEOUT_MS")
    # None: JPEGs in OUTPUT_DIR. Credentials come from the AWS chain only, never from here.
    object_store_url: str | None = Field(default=None, alias="OBJECT_STORE_URL")
    s3_endpoint_url: str | None = Field(default=None, alias="S3_ENDPOINT_URL")
    s3_region: str | None = Field(default=None, alias="S3_REGION")
    s3_addressing_style: AddressingStyle = Field(default="auto", alias="S3_ADDRESSING_STYLE")
    cache_control: str = Field(default=DEFAULT_CACHE_CONTROL, alias="CACHE_CONTROL")
    public_base_url: str | None = Field(default=None, alias="PUBLIC_BASE_URL")
    success_queue: str | None = Field(default=None, alias="SUCCESS_QUEUE")
    error_queue: str | None = Field(default=None, alias="ERROR_QUEUE")
    console_host: str = Field(default="127.0.0.1", alias="CONSOLE_HOST", min_length=1)
    console_port: int = Field(default=9110, ge=0, le=65535, alias="CONSOLE_PORT")
    # A secret: SecretStr keeps it out of reprs, and errors never echo it.
    console_token: SecretStr | None = Field(default=None, alias="CONSOLE_TOKEN")

    @field_validator("hosting_tasks_queue")
    @classmethod
    def _expand_hostname(cls, value: str) -> str:
        value = value.replace("{hostname}", default_consumer_name())
        if "{" in value or "}" in value:
            # `{L}:stream` must hash like L itself; a brace in L would move the
            # derived keys to another cluster slot.
            raise ValueError("may not contain { or } other than {hostname}")
        return value

    @field_validator("redis_cluster", mode="before")
    @classmethod
    def _auto_is_unset(cls, value: Any) -> Any:
        blank = isinstance(value, str) and value.strip().lower() in ("", "auto")
        return None if blank else value

    @field_validator("shm_name_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator(*_CASED, mode="before")
    @classmethod
    def _normalise_case(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        lower = ("text", "json", "flat", "daily", "map", "copy")
        return value.lower() if value.lower() in lower else value.upper()

    @field_validator("console_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < CONSOLE_TOKEN_MIN:
            raise ValueError(f"must be at least {CONSOLE_TOKEN_MIN} characters")
        return value

    @field_validator(*_OPTIONAL, mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("s3_addressing_style", "s3_region", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("s3_region")
    @classmethod
    def _region_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value):
            raise ValueError("must be a region name such as us-east-1, or auto for R2")
        return value

    @field_validator("cache_control")
    @classmethod
    def _header_value(cls, value: str) -> str:
        if not value.strip() or not re.fullmatch(r"[\x20-\x7e]+", value):
            raise ValueError("must be a header value: printable ASCII on one line")
        return value.strip()

    @field_validator("object_store_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_url(value)
        return value

    @field_validator("s3_endpoint_url", "public_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("may not hold a query, a fragment or a user name")
        try:
            parts.port  # noqa: B018 (parsing is the check)
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535") from None
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:
            urlsplit(value).port  # noqa: B018 (parsing is the check)
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535") from None
        return value


def mask_url(url: str) -> str:
    """`url` with its password, if any, replaced by `***`, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; CLI overrides are given by field name and beat every other source.

    Raises SettingsError with one line naming the offending setting.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = Settings.model_fields
    aliased = {fields[k].alias or k: v for k, v in given.items()}
    try:
        return Settings(**aliased)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "settings"
        value = err.get("input")
        if name in ("REDIS_URL", "S3_ENDPOINT_URL", "PUBLIC_BASE_URL") and isinstance(value, str):
            value = mask_url(value)
        secret = name == "CONSOLE_TOKEN"
        shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
        raise SettingsError(f"{name}: {err['msg']}{shown}") from None


def object_store_config(settings: Settings) -> ObjectStoreConfig | None:
    """The object store the settings name, or None when JPEGs go to OUTPUT_DIR."""
    if settings.object_store_url is None:
        return None
    return ObjectStoreConfig(
        url=settings.object_store_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        addressing_style=settings.s3_addressing_style,
        cache_control=settings.cache_control,
        public_base_url=settings.public_base_url,
    )
