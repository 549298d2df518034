"""Property tests of the two places where untrusted input meets the service: the task
message (`parse_task`, `read_ids`) and the file name made from an image id
(`safe_stem`, `file_name`).

Fast by default (FUZZ_EXAMPLES=200 examples per test); a dedicated run does 10,000:

    FUZZ_EXAMPLES=10000 .venv/bin/pytest -m fuzz tests/reliability/test_fuzz.py
"""

from __future__ import annotations

import copy
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from returner.errors import BadTask
from returner.files import file_name, safe_stem
from returner.settings import DEFAULT_SHM_NAME_PATTERN
from returner.stream import Keys
from returner.task import MAX_DIMENSION, NAME_MAX, Rules, Task, parse_task, read_ids

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ORDERS = ("RGB", "BGR", "RGBA", "BGRA", "GRAY")
ORDERS_BY_CHANNELS = {1: ("GRAY",), 3: ("RGB", "BGR"), 4: ("RGBA", "BGRA")}
SHM = "img_shm_3f2a9c"

# -- building blocks ----------------------------------------------------------------------

# Every code point, lone surrogates included (the default alphabet leaves them out), and
# the characters that matter to names and paths, so that they are not rare.
_char = st.characters(exclude_categories=()) | st.sampled_from(
    ["\ud800", "\udfff", "\x00", "/", "\\", ".", "\n", "\r", "\x1b", "\x7f", "%", "~", "_",
     "-", "a", "0", "f", "\u200b", "\u202e", "\ufeff", "\uffff", "가", "\U0001f600"]
)
_any_text = st.text(_char)
_names = st.sampled_from(
    ["", ".", "..", "/", "\x00", SHM, "img_shm_ab", "img_shm_", "img_shm_AB09", "/img_shm_ab",
     "img_shm_ab/../../x", "../etc/passwd", "img_shm_ab\x00", "img_shm_ab\n", "img_shm_ab\ud800",
     "img_shm_" + "a" * 128, "img_shm_" + "a" * 129, "img_shm_" + "f" * 300, "x" * 254,
     "x" * 255, "uint8", "RGB", "GRAY"]
)
_good_names = st.from_regex(DEFAULT_SHM_NAME_PATTERN, fullmatch=True)
_strings = _any_text | _names | st.text(_char, min_size=200, max_size=600)
_ints = st.integers() | st.sampled_from(
    [0, 1, 2, 3, 4, 5, -1, -3, MAX_DIMENSION - 1, MAX_DIMENSION, MAX_DIMENSION + 1,
     2**31 - 1, 2**31, 2**32 + 3, 2**63 - 1, 2**63, -(2**63), 2**64 + 1, 10**30, -(10**30),
     10**4000]
)
_floats = st.floats() | st.sampled_from([1.0, 3.0, -0.0, 1e308, float("inf"), float("nan")])
_scalars = st.none() | st.booleans() | _ints | _floats | _strings
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_strings, inner, max_size=5),
    max_leaves=12,
)
# A wide value for any one field: anything JSON can hold, plus near misses of the real thing.
_wide = (
    _json
    | st.lists(_ints, max_size=5)
    | st.sampled_from([[], [4], [4, 6], [4, 6, 3], [4, 6, 3, 1], [True, 6, 3], [4.0, 6, 3],
                       ["4", "6", "3"], {"h": 4}, "4x6x3", "uint16", "UINT8", "rgb", "RGBX"])
)
_small_dims = st.integers(1, 48)
_dims = st.one_of(_small_dims, _small_dims, _small_dims,  # mostly sides that fit
                  st.sampled_from([1, MAX_DIMENSION, MAX_DIMENSION + 1, 0, -1]))
_pattern_text = st.sampled_from(
    [DEFAULT_SHM_NAME_PATTERN, r".*", r"[^/]*", r"[\w.-]+", r"frame-\d+", r"img_shm_.*"]
)
_rules = st.builds(
    Rules,
    _pattern_text.map(re.compile),
    st.one_of(st.sampled_from([1, 12, 24, 1000, 10**6, 100_000_000]),
              st.integers(1, 10**12), st.just(MAX_DIMENSION**2)),
    st.sampled_from(ORDERS),
)

# Where one field of a valid message can be replaced; a path ending in an int is an
# element of `shape`.
_FIELDS: list[tuple[Any, ...]] = [
    ("request_id",), ("image_id",), ("channel_order",), ("shm_info",),
    ("shm_info", "shm_name"), ("shm_info", "shape"), ("shm_info", "dtype"),
    ("shm_info", "size"), ("shm_info", "shape", 0), ("shm_info", "shape", 1),
    ("shm_info", "shape", 2),
]


def encode(doc: Any, ascii_only: bool) -> bytes:
    """JSON as a producer would send it: escaped, or raw UTF-8 (lone surrogates then make
    the bytes invalid UTF-8, which is bad input too)."""
    text = json.dumps(doc, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A valid message with none, or a few, of its fields replaced, deleted or nudged."""
    height, width = draw(_dims), draw(_dims)
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    shape = [height, width] if channels is None else [height, width, channels]
    doc: dict[str, Any] = {
        "request_id": draw(st.sampled_from(["req_001", "r"]) | _strings),
        "image_id": draw(st.sampled_from(["image_001", "i"]) | _strings),
        "shm_info": {
            "shm_name": draw(st.one_of(_good_names, _good_names, _names)),
            "shape": shape,
            "dtype": "uint8",
            "size": height * width * (channels or 1),
        },
    }
    fitting = st.sampled_from(ORDERS_BY_CHANNELS[channels or 1])
    order = draw(st.one_of(st.none(), fitting, fitting, st.sampled_from(ORDERS)))
    if order is not None:
        doc["channel_order"] = order
    broken = draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3]))  # half keep every field valid
    for path in draw(st.lists(st.sampled_from(_FIELDS), min_size=broken, max_size=broken,
                              unique=True)):
        how = draw(st.sampled_from(["wide", "wide", "drop", "null", "nudge"]))
        _change(doc, path, how, copy.deepcopy(draw(_wide)),  # sampled values are shared
                draw(st.sampled_from([-1, 1, 65500, 2**64])))
    if draw(st.booleans()):  # unknown fields are ignored, whatever they hold
        doc[draw(_strings)] = draw(_json)
    return encode(doc, draw(st.booleans()))


def _change(doc: dict[str, Any], path: tuple[Any, ...], how: str, value: Any, step: int
            ) -> None:
    """Replace, delete, null or nudge (add `step` to an int) the field at `path`."""
    target: Any = doc
    for key in path[:-1]:
        if not isinstance(target, dict | list) or key not in (
            target if isinstance(target, dict) else range(len(target))
        ):
            return  # an earlier change removed the parent
        target = target[key]
    last = path[-1]
    if (isinstance(target, dict) and last in target) or (
        isinstance(target, list) and isinstance(last, int) and last < len(target)
    ):
        old = target[last]
        if how == "drop":
            del target[last]
        elif how == "null":
            target[last] = None
        elif how == "nudge" and type(old) is int:
            target[last] = old + step
        else:
            target[last] = value


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """The bytes of a (near-)valid message, then flipped, cut, spliced or repeated."""
    raw = bytearray(draw(near_valid()))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "repeat"]))
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"\x00", b"\xff", b"\xed\xa0\x80", b"\\u0000", b"\\ud800", b'"', b"[", b"{",
                 b"-", b"e999", b"1" * 5000, b"[" * 3000, b"NaN", b"Infinity"]))
        elif op == "delete":
            del raw[pos : pos + draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = raw[pos : pos + draw(st.integers(1, 64))] * draw(st.integers(1, 4))
    return bytes(raw)


# Raw JSON texts the encoder above cannot make: numbers past the int-parsing limit,
# nesting past the recursion limit, duplicate keys, odd whitespace and BOMs.
_raw_texts = st.sampled_from(
    [
        b'{"request_id": "r", "image_id": "i", "shm_info": {"shm_name": "img_shm_ab", '
        b'"shape": [' + b"9" * 5000 + b', 1], "dtype": "uint8", "size": 1}}',
        b'{"request_id": ' + b"1" * 4301 + b"}",
        b"[" * 50_000 + b"]" * 50_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"request_id": "r", "request_id": 5, "image_id": "i"}',
        b"\xef\xbb\xbf" + encode({"request_id": "r"}, True),
        b'\t\n {"request_id": "r"} \n',
        b"1e999999",
        b"-",
        b'"\\ud800"',
        b'{"shm_info": {"shm_name": "\\ud800\\udc00"}}',
    ]
)


# -- the properties ---------------------------------------------------------------------


def check_parse(raw: bytes, rules: Rules) -> Task | None:
    """parse_task raises BadTask (with a reason) or returns a Task obeying every rule."""
    try:
        task = parse_task(raw, rules)
    except BadTask as exc:
        assert str(exc), "a BadTask must say what is wrong"
        return None
    assert isinstance(task, Task)
    doc = json.loads(raw.decode("utf-8"))  # it was accepted, so it is UTF-8 JSON
    info = doc["shm_info"]
    h, w, c = task.height, task.width, task.channels
    assert all(type(v) is int for v in (h, w, c, info["size"])), "bools are not ints"
    assert 1 <= h <= MAX_DIMENSION and 1 <= w <= MAX_DIMENSION
    assert c in (1, 3, 4)
    assert info["shape"] in ([h, w], [h, w, c]) and (len(info["shape"]) == 3 or c == 1)
    assert info["size"] == h * w * c == task.size
    assert info["dtype"] == "uint8"
    assert task.channel_order in ORDERS_BY_CHANNELS[c]
    if doc.get("channel_order") is not None:
        assert task.channel_order == doc["channel_order"]
    assert h * w <= rules.max_pixels
    name = task.shm_name
    assert name == info["shm_name"]
    assert rules.shm_name_pattern.fullmatch(name)
    assert "/" not in name and "\x00" not in name
    assert 1 <= len(name.encode("utf-8")) < NAME_MAX  # strict: no lone surrogate either
    assert isinstance(task.request_id, str) and task.request_id == doc["request_id"]
    assert isinstance(task.image_id, str) and task.image_id == doc["image_id"]
    assert task.request_id and task.image_id
    return task


def check_read_ids(raw: bytes, task: Task | None) -> None:
    ids = read_ids(raw)  # must not raise, whatever the bytes
    assert isinstance(ids, tuple) and len(ids) == 3
    assert all(v is None or isinstance(v, str) for v in ids)
    if task is not None:
        assert ids == (task.request_id, task.image_id, task.shm_name)


@FUZZ
@given(st.binary(max_size=2048) | mutated() | _raw_texts, _rules)
def test_arbitrary_bytes(raw: bytes, rules: Rules) -> None:
    check_read_ids(raw, check_parse(raw, rules))


@FUZZ
@given(_json | st.dictionaries(st.sampled_from(_FIELDS).map(lambda p: p[0]), _json),
       st.booleans(), _rules)
def test_arbitrary_json_values(doc: Any, ascii_only: bool, rules: Rules) -> None:
    raw = encode(doc, ascii_only)
    task = check_parse(raw, rules)
    check_read_ids(raw, task)
    if not isinstance(doc, dict):
        assert task is None and read_ids(raw) == (None, None, None)


@FUZZ
@given(near_valid(), _rules)
def test_near_valid_messages(raw: bytes, rules: Rules) -> None:
    check_read_ids(raw, check_parse(raw, rules))


@FUZZ
@given(st.integers(1, 64), st.integers(1, 64), st.sampled_from([None, 1, 3, 4]), _rules)
def test_valid_messages_are_accepted(height: int, width: int, channels: int | None,
                                     rules: Rules) -> None:
    """The other side: a message that follows every rule gives its Task."""
    shape = [height, width] if channels is None else [height, width, channels]
    c = channels or 1
    doc = {"request_id": "r", "image_id": "i",
           "shm_info": {"shm_name": "img_shm_0f", "shape": shape, "dtype": "uint8",
                        "size": height * width * c}}
    raw = encode(doc, True)
    fits = (rules.shm_name_pattern.fullmatch("img_shm_0f") is not None
            and height * width <= rules.max_pixels
            and not (c > 1 and rules.default_order == "GRAY"))
    task = check_parse(raw, rules)
    assert (task is not None) == fits
    check_read_ids(raw, task)


# -- file names -------------------------------------------------------------------------

_ids = (
    _any_text
    | st.text(st.sampled_from(["/", ".", "\x00", "\ud800", "a", "%", "가", "\n"]), max_size=40)
    | st.text(_char, min_size=150, max_size=1200)
    | st.sampled_from(["", ".", "..", "...", "../x", "/abs", "a/../../b", ".hidden", "a..b",
                       "%2F", "%2E%2E", "~"])
)
_millis = st.integers(0, 2**42) | st.sampled_from([0, 1_704_067_199_999, 4_102_444_800_123])
_suffixes = st.sampled_from([0, 1, 2, 999_999])


def check_component(name: str, stem: bool = False) -> None:
    """One safe path component: what lands in OUTPUT_DIR is exactly this file. A stem is
    only a prefix of a name, so it may be empty (the id "" gives the stem "")."""
    assert (name or stem) and name not in (".", "..")
    assert os.path.basename(name) == name and "/" not in name and "\\" not in name
    assert "\x00" not in name
    assert not any(unicodedata.category(ch) == "Cc" for ch in name), repr(name)
    assert not name.startswith(".") and ".." not in name
    assert len(name.encode("utf-8")) <= 255  # strict UTF-8: no lone surrogate either


@FUZZ
@given(_ids, _millis, _suffixes)
def test_file_name_is_one_safe_component(image_id: str, millis: int, suffix: int) -> None:
    stem = safe_stem(image_id)
    check_component(stem, stem=True)
    name = file_name(image_id, millis, suffix)
    check_component(name)
    assert name.startswith(stem + "_") and name.endswith(".jpg")


@FUZZ
@given(st.lists(_ids, min_size=2, unique=True), _millis, _suffixes)
def test_distinct_ids_give_distinct_names(ids: list[str], millis: int, suffix: int) -> None:
    stems = [safe_stem(i) for i in ids]
    names = [file_name(i, millis, suffix) for i in ids]
    assert len(set(stems)) == len(ids), "two ids collapsed to one stem"
    assert len(set(names)) == len(ids), "two ids collapsed to one file name"


@FUZZ
@given(st.text(_char, min_size=1, max_size=30), st.integers(10, 400),
       st.lists(st.text(_char, max_size=6), min_size=2, unique=True), _millis)
def test_long_ids_sharing_a_prefix_stay_distinct(unit: str, repeat: int, tails: list[str],
                                                 millis: int) -> None:
    """Over the length limit the tail becomes a hash: a shared prefix must not collapse."""
    ids = [unit * repeat + tail for tail in tails]
    names = [file_name(i, millis, 0) for i in ids]
    for name in names:
        check_component(name)
    assert len(set(names)) == len(ids)


# -- through the whole service -----------------------------------------------------------


class ServiceUnderFuzz:
    """One worker in this process for every example: what one message does to it, the
    next one meets."""

    def __init__(self, run: Any, r: Any, queue: str) -> None:
        self.run, self.r, self.queue, self.pushed = run, r, queue, 0

    def push(self, messages: list[bytes]) -> None:
        self.r.rpush(self.queue, *messages)
        self.pushed += len(messages)
        self.run.settled(self.pushed)


@pytest.fixture
def fuzzed_service(make_settings: Any, r: Any) -> Iterator[ServiceUnderFuzz]:
    from tests.test_worker import running

    settings = make_settings(MAX_DELIVERIES=2)
    with running(settings) as run:
        yield ServiceUnderFuzz(run, r, settings.hosting_tasks_queue)
        assert run.thread.is_alive() and not run.errors
    keys = Keys.for_queue(settings.hosting_tasks_queue)
    assert r.llen(settings.hosting_tasks_queue) == 0 and r.xlen(keys.stream) == 0
    assert r.xpending(keys.stream, settings.consumer_group)["pending"] == 0


@settings(max_examples=max(EXAMPLES // 4, 25), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=512) | mutated() | _raw_texts | near_valid()
                | (_json | st.dictionaries(st.sampled_from(_FIELDS).map(lambda p: p[0]), _json))
                .flatmap(lambda doc: st.booleans().map(lambda a: encode(doc, a))),
                min_size=1, max_size=8))
def test_arbitrary_messages_through_the_service(fuzzed_service: ServiceUnderFuzz,
                                                messages: list[bytes]) -> None:
    """Whatever the messages, the worker settles every one and stays alive (the fixture
    checks, once every example has run, that nothing is left pending)."""
    fuzzed_service.push(messages)
