"""The task message, its validation, and the outcome of handling one delivery."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from returner.errors import BadTask

ChannelOrder = Literal["RGB", "BGR", "RGBA", "BGRA", "GRAY"]
CHANNEL_ORDERS: tuple[str, ...] = get_args(ChannelOrder)
# The orders a frame of 1, 3 or 4 channels may be in; simplejpeg reads each natively.
ORDERS_BY_CHANNELS = {1: ("GRAY",), 3: ("RGB", "BGR"), 4: ("RGBA", "BGRA")}
MAX_DIMENSION = 65500  # libjpeg's limit on either side
NAME_MAX = 255
ECHO_MAX = 80  # characters of a message's value repeated in an error, a record or a log


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


def brief(value: str | None, limit: int = ECHO_MAX) -> str | None:
    """An id as a log line shows it: cut to about `limit` characters."""
    return None if value is None else _cut(value, limit)


def echo(value: object, limit: int = ECHO_MAX) -> str:
    """A value from a message as it may be repeated: repr (so control characters and
    lone surrogates are escaped), cut to about `limit` characters."""
    return _cut(repr(value), limit)


class _ShmInfo(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    shm_name: str
    shape: list[int]
    dtype: str
    size: int


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    request_id: str
    image_id: str
    shm_info: _ShmInfo
    channel_order: ChannelOrder | None = None


@dataclass(frozen=True)
class Rules:
    """The limits a message is checked against, taken from the settings."""

    shm_name_pattern: re.Pattern[str]
    max_pixels: int
    default_order: str
    max_task_bytes: int = 65536
    copy_segments: bool = False  # SEGMENT_READ=copy: pread, not mmap (see frames.py)


@dataclass(frozen=True)
class Task:
    """A validated task: the frame is `height x width x channels` uint8 in `shm_name`."""

    request_id: str
    image_id: str
    shm_name: str
    height: int
    width: int
    channels: int
    channel_order: str

    @property
    def size(self) -> int:
        return self.height * self.width * self.channels


def read_ids(raw: bytes) -> tuple[str | None, str | None, str | None]:
    """Best-effort request_id, image_id and shm_name of a message; never raises."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, TypeError, RecursionError, AttributeError):
        return None, None, None
    if not isinstance(doc, dict):
        return None, None, None
    info = doc.get("shm_info")
    name = info.get("shm_name") if isinstance(info, dict) else None
    return _str(doc.get("request_id")), _str(doc.get("image_id")), _str(name)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and _is_text(value) else None


def encodable(text: str) -> str:
    """`text` as valid Unicode: a lone surrogate (which UTF-8 cannot carry) is escaped."""
    return text if _is_text(text) else text.encode("utf-8", "backslashreplace").decode()


def _is_text(value: str) -> bool:
    """Whether `value` is valid Unicode text (JSON can carry lone surrogates; UTF-8 cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_task(raw: bytes, rules: Rules) -> Task:
    """Validate one queue element. Raises BadTask, and nothing else, saying what is wrong."""
    try:
        msg = _Message.model_validate(json.loads(raw.decode("utf-8")))
    except (ValueError, TypeError, RecursionError) as exc:
        raise BadTask(_describe(exc)) from None
    if not msg.request_id or not msg.image_id:
        raise BadTask("request_id and image_id must not be empty")
    if not (_is_text(msg.request_id) and _is_text(msg.image_id)):
        raise BadTask("request_id and image_id must be valid Unicode text")
    info = msg.shm_info
    _check_name(info.shm_name, rules.shm_name_pattern)
    if info.dtype != "uint8":
        raise BadTask(f"unsupported dtype {echo(info.dtype)} (only uint8)")
    height, width, channels = _check_shape(info.shape, rules.max_pixels)
    if info.size != height * width * channels:
        raise BadTask(
            f"size {echo(info.size)} does not fit shape {echo(info.shape)} (expected "
            f"{height * width * channels} bytes)"
        )
    order = _resolve_order(msg.channel_order, rules.default_order, channels)
    return Task(msg.request_id, msg.image_id, info.shm_name, height, width, channels, order)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{where}: {first['msg']}{more}"
    if isinstance(exc, UnicodeDecodeError):
        return "message is not UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return f"message is not JSON: {exc.msg} at position {exc.pos}"
    return f"message is not valid: {exc}"


def name_problem(name: str, pattern: re.Pattern[str]) -> str | None:
    """Why `name` may not be opened or unlinked as a segment, or None if it may."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if name in ("", ".", "..") or "/" in name or "\x00" in name or len(encoded) >= NAME_MAX:
        return "is not a valid segment name"
    if not pattern.fullmatch(name):
        return "does not match SHM_NAME_PATTERN"
    return None


def _check_name(name: str, pattern: re.Pattern[str]) -> None:
    problem = name_problem(name, pattern)
    if problem:
        raise BadTask(f"shm_name {echo(name)} {problem}")


def _check_shape(shape: list[int], max_pixels: int) -> tuple[int, int, int]:
    if len(shape) not in (2, 3):
        raise BadTask(f"shape {echo(shape)} must be [H, W] or [H, W, C]")
    height, width = shape[0], shape[1]
    channels = shape[2] if len(shape) == 3 else 1
    if channels not in (1, 3, 4):
        raise BadTask(f"shape {echo(shape)}: {echo(channels)} channels (expected 1, 3 or 4)")
    if not (1 <= height <= MAX_DIMENSION and 1 <= width <= MAX_DIMENSION):
        raise BadTask(f"shape {echo(shape)}: each side must be between 1 and {MAX_DIMENSION}")
    # Python ints do not overflow, and both sides are already bounded.
    if height * width > max_pixels:
        raise BadTask(f"shape {shape}: {height * width} pixels exceeds MAX_PIXELS={max_pixels}")
    return height, width, channels


def _resolve_order(given: str | None, default: str, channels: int) -> str:
    if given is not None:
        if given not in ORDERS_BY_CHANNELS[channels]:
            raise BadTask(f"channel_order {given} does not fit {channels} channel(s)")
        return given
    if channels == 1:
        return "GRAY"
    base = default[:3]
    if base == "GRA":
        raise BadTask(f"CHANNEL_ORDER GRAY does not fit {channels} channels")
    return base if channels == 3 else base + "A"


@dataclass(frozen=True)
class Entry:
    """One delivery of a stream entry: its ID, the list element as pushed, Redis's count."""

    id: str
    payload: bytes
    deliveries: int

    @property
    def millis(self) -> int:
        return int(self.id.split("-", 1)[0])


class Kind(enum.StrEnum):
    """How handling one delivery ended."""

    COMPLETED = "completed"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    RETRY = "retry"  # transient, this task's own: stays pending, delivered again later
    PAUSE = "pause"  # the output is failing: the worker pauses, then tries the batch again

    @property
    def settles(self) -> bool:
        """Whether the delivery is acknowledged (or dead-lettered) now."""
        return self not in (Kind.RETRY, Kind.PAUSE)

    @property
    def status(self) -> str:
        """The status of the record (and the event): completed or failed."""
        return "completed" if self in (Kind.COMPLETED, Kind.DUPLICATE) else "failed"


OUTCOMES = (Kind.COMPLETED, Kind.DUPLICATE, Kind.FAILED, Kind.DEAD_LETTERED)


@dataclass(frozen=True)
class Staged:
    """An encoded JPEG put where it goes, not yet under its final name or recorded."""

    ref: str  # where it is now: a temp file's path, or an object's key
    size: int  # bytes
    url: str | None = None  # its image_url, when that is known before it is recorded


@dataclass
class Outcome:
    """What handling one delivery came to; settling it is a separate step."""

    entry: Entry
    kind: Kind
    request_id: str | None = None
    image_id: str | None = None
    error: str | None = None
    shm_name: str | None = None  # a segment to unlink once the outcome is durable
    data: bytes | None = None  # the encoded JPEG, until it is staged
    staged: Staged | None = None  # the JPEG, durable, waiting for its record
    segment_missing: bool = False  # FAILED because the segment did not exist
    recorded_url: str | None = None  # a DUPLICATE's: the image_url its record holds
    retried: bool = False  # processed again in hand (the output failed the last time)
    failing: str = ""  # a PAUSE's: what fails, "disk" or "object_store" (the error kind)
    failure: str = ""  # and how, for an object store: unreachable, timeout, throttled...
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def pause(self, exc: Exception) -> None:
        """The output failed this delivery (`exc`, transient): pause, then try again."""
        self.kind, self.error = Kind.PAUSE, str(exc)
        self.failure = getattr(exc, "kind", "")  # an ObjectStoreUnavailable's
        self.failing = "object_store" if self.failure else "disk"

    @property
    def key(self) -> tuple[str, str] | None:
        if self.request_id is None or self.image_id is None:
            return None
        return self.request_id, self.image_id


@dataclass(frozen=True)
class Decision:
    """What committing an outcome decided: how it settles, when (the timestamp its record
    and its event share), and the JPEG it recorded (for a duplicate, the one recorded
    before)."""

    outcome: Outcome
    kind: Kind
    timestamp: str
    file_path: Path | None = None
    image_url: str | None = None
