"""parse_task / read_ids: every bad message is a BadTask, never another exception."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from returner.errors import BadTask
from returner.settings import DEFAULT_SHM_NAME_PATTERN
from returner.task import MAX_DIMENSION, Rules, Task, parse_task, read_ids

MAX_PIXELS = 1_000_000
SHM = "img_shm_3f2a9c"


def rules(default_order: str = "RGB", max_pixels: int = MAX_PIXELS) -> Rules:
    return Rules(re.compile(DEFAULT_SHM_NAME_PATTERN), max_pixels, default_order)


def message(shape: list[int] | None = None, **changes: Any) -> dict[str, Any]:
    """A valid message; `changes` replace top-level fields, `shape` also fixes `size`."""
    shape = [4, 6, 3] if shape is None else shape
    size = 1
    for side in shape:
        size *= side
    doc: dict[str, Any] = {
        "request_id": "req_001",
        "image_id": "image_001",
        "shm_info": {"shm_name": SHM, "shape": shape, "dtype": "uint8", "size": size},
    }
    doc.update(changes)
    return doc


def with_info(**changes: Any) -> dict[str, Any]:
    doc = message()
    doc["shm_info"].update(changes)
    return doc


def without(path: tuple[str, ...]) -> dict[str, Any]:
    doc = copy.deepcopy(message())
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def assert_bad(raw: bytes, rule: Rules | None = None) -> BadTask:
    with pytest.raises(BadTask) as info:
        parse_task(raw, rule or rules())
    assert str(info.value), "a BadTask must say what is wrong"
    return info.value


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"{", b'{"request_id": ', b"\x00\x01\x02", b"[" * 100_000, b"NaN"],
    ids=["empty", "text", "open-brace", "truncated", "binary", "deep-nesting", "nan"],
)
def test_not_json(raw: bytes) -> None:
    assert_bad(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"request_id": "\xff\xfe", "image_id": "i"}',
        encode(message())[:-1] + b"\x80}",
        "{\"request_id\": \"caf\u00e9\"}".encode("latin-1"),
    ],
    ids=["invalid-bytes", "stray-continuation", "latin-1"],
)
def test_not_utf8(raw: bytes) -> None:
    assert_bad(raw)


def test_utf16_encoded_json_is_not_utf8() -> None:
    # SPEC: producers push UTF-8 JSON; a document in another encoding is bad input.
    assert_bad(json.dumps(message()).encode("utf-16"))


@pytest.mark.parametrize("doc", [[], [message()], "a string", 42, 1.5, None, True])
def test_json_that_is_not_an_object(doc: Any) -> None:
    assert_bad(encode(doc))


@pytest.mark.parametrize(
    "path",
    [
        ("request_id",),
        ("image_id",),
        ("shm_info",),
        ("shm_info", "shm_name"),
        ("shm_info", "shape"),
        ("shm_info", "dtype"),
        ("shm_info", "size"),
    ],
    ids=lambda p: ".".join(p),
)
def test_missing_field(path: tuple[str, ...]) -> None:
    error = assert_bad(encode(without(path)))
    assert path[-1] in str(error)


@pytest.mark.parametrize(
    "doc",
    [
        message(request_id=1),
        message(image_id=7),
        message(request_id=None),
        message(image_id=["image_001"]),
        message(shm_info="img_shm_3f2a9c"),
        message(shm_info=[SHM, [4, 6, 3], "uint8", 72]),
        message(channel_order=3),
        with_info(shm_name=123),
        with_info(dtype=8),
        with_info(size=True),
        with_info(size=72.0),
        with_info(size="72"),
        with_info(size=None),
        with_info(shape=[4, 6, True]),
        with_info(shape=[4.0, 6, 3]),
        with_info(shape=["4", "6", "3"]),
        with_info(shape="4x6x3"),
        with_info(shape={"h": 4, "w": 6}),
    ],
    ids=[
        "request_id-int", "image_id-int", "request_id-null", "image_id-list",
        "shm_info-str", "shm_info-list", "channel_order-int", "shm_name-int", "dtype-int",
        "size-bool", "size-float", "size-str", "size-null", "shape-bool", "shape-float",
        "shape-str-items", "shape-str", "shape-object",
    ],
)
def test_wrong_type(doc: dict[str, Any]) -> None:
    assert_bad(encode(doc))


@pytest.mark.parametrize(
    "shape",
    [[], [4], [4, 6, 3, 1], [2, 2, 2, 2, 2]],
    ids=["rank0", "rank1", "rank4", "rank5"],
)
def test_shape_of_wrong_rank(shape: list[int]) -> None:
    assert_bad(encode(message(shape)))


@pytest.mark.parametrize(
    "shape",
    [
        [0, 6, 3], [4, 0, 3], [-4, 6, 3], [4, -6, 3], [-4, -6, 3], [0, 0],
        [MAX_DIMENSION + 1, 1], [1, MAX_DIMENSION + 1, 3], [10**30, 10**30, 3],
    ],
)
def test_bad_dimensions(shape: list[int]) -> None:
    doc = message(shape)
    doc["shm_info"]["size"] = abs(doc["shm_info"]["size"]) or 1
    assert_bad(encode(doc), rules(max_pixels=10**70))


def test_largest_dimension_is_accepted() -> None:
    task = parse_task(encode(message([MAX_DIMENSION, 1])), rules(max_pixels=10**6))
    assert (task.height, task.width) == (MAX_DIMENSION, 1)


@pytest.mark.parametrize("channels", [0, 2, 5, -1, 3 + 2**64])
def test_bad_channel_count(channels: int) -> None:
    assert_bad(encode(message([4, 6, channels])))


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int8", "UINT8", "", "u1"])
def test_unknown_dtype(dtype: str) -> None:
    assert_bad(encode(with_info(dtype=dtype)))


@pytest.mark.parametrize("order", ["rgb", "RGBX", "YUV", "", "BGR "])
def test_unknown_channel_order(order: str) -> None:
    assert_bad(encode(message(channel_order=order)))


@pytest.mark.parametrize(
    ("shape", "order"),
    [
        ([4, 6, 4], "RGB"), ([4, 6, 4], "BGR"), ([4, 6, 4], "GRAY"),
        ([4, 6, 3], "GRAY"), ([4, 6, 3], "RGBA"), ([4, 6, 3], "BGRA"),
        ([4, 6], "RGB"), ([4, 6, 1], "BGR"), ([4, 6, 1], "RGBA"),
    ],
)
def test_channel_order_not_fitting_channels(shape: list[int], order: str) -> None:
    assert_bad(encode(message(shape, channel_order=order)))


def test_gray_default_does_not_fit_colour_frame() -> None:
    assert_bad(encode(message([4, 6, 3])), rules(default_order="GRAY"))


@pytest.mark.parametrize("size", [0, 71, 73, 24, 72 * 2, -72])
def test_size_not_matching_shape(size: int) -> None:
    error = assert_bad(encode(with_info(size=size)))
    assert "size" in str(error)


def test_more_than_max_pixels() -> None:
    error = assert_bad(encode(message([100, 101, 3])), rules(max_pixels=10_000))
    assert "MAX_PIXELS" in str(error)


def test_exactly_max_pixels_is_accepted() -> None:
    assert parse_task(encode(message([100, 100, 3])), rules(max_pixels=10_000)).size == 30_000


@pytest.mark.parametrize(
    "name",
    [
        "img_shm_ab/cd", "/img_shm_abcd", "../img_shm_ab", "", "img_shm_ab\x00cd",
        "img_shm_", "img_shm_xyz", "other_3f2a", "img_shm_3f2a\n", " img_shm_3f2a",
        "img_shm_" + "a" * 300,
    ],
    ids=[
        "slash", "leading-slash", "dotdot", "empty", "nul", "no-hex", "not-hex",
        "other-prefix", "newline", "leading-space", "too-long",
    ],
)
def test_bad_shm_name(name: str) -> None:
    assert_bad(encode(with_info(shm_name=name)))


def test_shm_name_with_lone_surrogate() -> None:
    # JSON may carry "\ud800" escapes; the result must still be a BadTask.
    assert_bad(encode(with_info(shm_name="img_shm_ab\ud800")))


def test_shm_name_pattern_comes_from_rules() -> None:
    custom = Rules(re.compile(r"frame-\d+"), MAX_PIXELS, "RGB")
    assert parse_task(encode(with_info(shm_name="frame-12")), custom).shm_name == "frame-12"
    assert_bad(encode(with_info(shm_name=SHM)), custom)


@pytest.mark.parametrize("field", ["request_id", "image_id"])
def test_empty_id(field: str) -> None:
    doc = message()
    doc[field] = ""
    assert_bad(encode(doc))


# --- good input ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[5, 7], [5, 7, 1]])
def test_grayscale_shapes(shape: list[int]) -> None:
    task = parse_task(encode(message(shape)), rules())
    assert task == Task("req_001", "image_001", SHM, 5, 7, 1, "GRAY")
    assert task.size == 35


def test_three_channels_default_to_rgb() -> None:
    task = parse_task(encode(message([4, 6, 3])), rules())
    assert (task.height, task.width, task.channels, task.channel_order) == (4, 6, 3, "RGB")
    assert task.size == 72


def test_four_channels_widen_the_default() -> None:
    assert parse_task(encode(message([4, 6, 4])), rules()).channel_order == "RGBA"
    assert parse_task(encode(message([4, 6, 4])), rules("BGR")).channel_order == "BGRA"
    assert parse_task(encode(message([4, 6, 3])), rules("BGR")).channel_order == "BGR"


def test_gray_default_for_gray_frame() -> None:
    assert parse_task(encode(message([4, 6])), rules("GRAY")).channel_order == "GRAY"


@pytest.mark.parametrize(
    ("shape", "order"),
    [
        ([4, 6, 3], "RGB"), ([4, 6, 3], "BGR"), ([4, 6, 4], "RGBA"), ([4, 6, 4], "BGRA"),
        ([4, 6], "GRAY"), ([4, 6, 1], "GRAY"),
    ],
)
def test_explicit_channel_order(shape: list[int], order: str) -> None:
    # The default must not matter when the message names its order.
    for default in ("RGB", "BGR"):
        assert parse_task(encode(message(shape, channel_order=order)), rules(default)
                          ).channel_order == order


def test_explicit_null_channel_order_uses_default() -> None:
    assert parse_task(encode(message(channel_order=None)), rules("BGR")).channel_order == "BGR"


def test_unknown_fields_are_ignored_and_ids_kept_verbatim() -> None:
    doc = message(request_id="요청/../1", image_id="../이미지", extra={"x": 1})
    doc["shm_info"]["note"] = "ignored"
    task = parse_task(encode(doc), rules())
    assert (task.request_id, task.image_id) == ("요청/../1", "../이미지")


def test_raw_utf8_non_ascii_is_accepted() -> None:
    raw = json.dumps(message(image_id="이미지_001"), ensure_ascii=False).encode()
    assert parse_task(raw, rules()).image_id == "이미지_001"


# --- read_ids --------------------------------------------------------------------------


def test_read_ids_of_a_good_message() -> None:
    assert read_ids(encode(message())) == ("req_001", "image_001", SHM)


def test_read_ids_of_a_partly_bad_message() -> None:
    doc = message(request_id=5, shm_info={"shm_name": SHM, "shape": "bogus"})
    assert read_ids(encode(doc)) == (None, "image_001", SHM)
    assert read_ids(encode(message(shm_info=[SHM]))) == ("req_001", "image_001", None)
    assert read_ids(encode({"shm_info": {"shm_name": 3}, "image_id": "x"})) == (None, "x", None)


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"\xff\xfe\x00", b"null", b"[]", b'"text"', b"[" * 100_000, b"{" * 100_000,
        b'{"request_id": ', b"1e999999", b'{"shm_info": null}', b'{"shm_info": [1, 2]}',
    ],
)
def test_read_ids_never_raises(raw: bytes) -> None:
    assert read_ids(raw) == (None, None, None)


# --- properties ------------------------------------------------------------------------


def _parse_only_badtask(raw: bytes) -> None:
    try:
        result = parse_task(raw, rules())
    except BadTask:
        return
    assert isinstance(result, Task)


# Any text, lone surrogates included (hypothesis's default alphabet has them, and JSON
# "\udXXX" escapes decode to them), and names built from the characters that matter.
_hostile = st.sampled_from(["a", "0", "f", "/", ".", "\x00", "\n", "\ud800", "\udfff", "한"])
_text = (
    st.text(max_size=12)
    | st.sampled_from(["", SHM, "img_shm_ab", "uint8", "RGB", "BGRA", "GRAY", "image_001"])
    | st.text(_hostile, max_size=6).map(lambda tail: "img_shm_" + tail)
)
_ints = st.integers(-3, 8) | st.integers() | st.sampled_from([MAX_DIMENSION, MAX_DIMENSION + 1])
_scalars = st.none() | st.booleans() | _ints | st.floats() | _text
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=10,
)
_orders = st.sampled_from(["RGB", "BGR", "RGBA", "BGRA", "GRAY"])
# Well-typed messages reach every check after the schema (name, dtype, shape, size, order).
_typed = st.fixed_dictionaries(
    {
        "request_id": _text,
        "image_id": _text,
        "shm_info": st.fixed_dictionaries(
            {
                "shm_name": _text,
                "shape": st.lists(_ints, max_size=4),
                "dtype": st.sampled_from(["uint8", "uint16"]) | _text,
                "size": _ints,
            }
        ),
    },
    optional={"channel_order": _orders},
)
# Loose ones: any field missing or of any JSON type.
_loose = st.fixed_dictionaries(
    {},
    optional={
        "request_id": _text | _json,
        "image_id": _text | _json,
        "shm_info": _json
        | st.fixed_dictionaries(
            {},
            optional={"shm_name": _json, "shape": _json, "dtype": _json, "size": _json},
        ),
        "channel_order": _orders | _json,
    },
)
_message = _typed | _loose


@given(st.binary())
def test_arbitrary_bytes_give_badtask_or_task(raw: bytes) -> None:
    _parse_only_badtask(raw)
    assert len(read_ids(raw)) == 3


@given(_message)
def test_arbitrary_messages_give_badtask_or_task(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    _parse_only_badtask(raw)
    sent = json.loads(raw)  # as a reader sees it: escaped surrogate pairs are joined
    rid, iid, _name = read_ids(raw)
    assert rid == text_or_none(sent.get("request_id"))
    assert iid == text_or_none(sent.get("image_id"))


def text_or_none(value: Any) -> str | None:
    """An id as read_ids gives it: a string that is valid Unicode text, else None."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value
