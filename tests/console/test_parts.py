"""Pure parts of the console: the chart's geometry, how figures are shown, which hosts
are loopback, the access rule, the token check, where a sign-in may lead, and which
requests count as the console's own."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.requests import Request

from returner.console.auth import Access, local_target, same_origin
from returner.console.chart import MINUTES, NARROW, hour_chart, nice_ceiling
from returner.console.server import check_access, loopback
from returner.console.views import age, name, since, when
from returner.errors import SettingsError
from returner.settings import Settings

NOW = datetime(2026, 12, 3, 14, 30, 20, tzinfo=UTC)


def test_nice_ceilings() -> None:
    assert [nice_ceiling(v) for v in (0, 1, 10, 11, 20, 21, 26, 51, 215, 999, 12_001)] == [
        10, 10, 10, 20, 20, 25, 50, 100, 250, 1000, 20_000]


def test_the_chart_puts_each_minute_in_its_place() -> None:
    rows = [("2026-12-03T14:30", 7, 0), ("2026-12-03T14:29", 30, 2), ("2026-12-03T13:31", 4, 1),
            ("2026-12-03T13:30", 99, 99)]  # 13:30 is an hour ago: not shown
    chart = hour_chart(rows, NOW)
    assert len(chart.bars) == MINUTES
    assert [b.label for b in (chart.bars[0], chart.bars[-1])] == ["13:31", "14:30"]
    assert (chart.completed, chart.failed) == (41, 3)
    assert (chart.bars[-2].completed, chart.bars[-2].failed) == (30, 2)
    assert [label for _, label in chart.y_ticks] == ["0", "25", "50"]
    tallest = chart.bars[-2]
    assert tallest.completed_y + tallest.completed_height == chart.bottom
    assert tallest.failed_y + tallest.failed_height == tallest.completed_y  # stacked on top
    assert tallest.failed_height >= 3  # two failures among thirty still show
    assert chart.bars[1].completed_height == 0 and chart.bars[1].failed_height == 0
    assert chart.recent == 37 and chart.recent_s == 4 * 60 + 20
    assert [(a, label) for _, label, a in chart.x_ticks] == [
        ("start", "13:31"), ("middle", "13:46"), ("middle", "14:01"), ("middle", "14:15"),
        ("end", "14:30")]
    narrow = hour_chart(rows, NOW, NARROW)
    assert narrow.width == NARROW[0] and len(narrow.x_ticks) == NARROW[2]
    assert all(b.x + b.width <= narrow.width for b in narrow.bars)


def test_an_empty_hour_is_an_empty_chart() -> None:
    chart = hour_chart([], NOW)
    assert chart.completed == chart.failed == chart.recent == 0 and chart.per_second == 0
    assert [label for _, label in chart.y_ticks] == ["0", "5", "10"]


def test_figures_read_at_a_glance() -> None:
    assert [age(s) for s in (None, 0.25, 9.94, 42, 60, 3599, 3600, 7500, 86400 * 3 + 3600 * 4)
            ] == ["\N{EN DASH}", "0.2 s", "9.9 s", "42 s", "1 min", "59 min", "1 h 0 min",
                  "2 h 5 min", "3 d 4 h"]  # fmt: skip
    assert when("2026-12-03T14:30:20.123456+00:00") == "2026-12-03 14:30:20"
    assert when("2026-12-03T23:30:20+09:00") == "2026-12-03 14:30:20"
    assert when("not a time") == "not a time" and when(None) == "\N{EN DASH}"
    assert name("/srv/out/page_1_20261203_143020.jpg") == "page_1_20261203_143020.jpg"
    assert name("/srv/out/2026-12-03/page_1_20261203_143020.jpg") == (
        "2026-12-03/page_1_20261203_143020.jpg")
    assert since("junk") == "\N{EN DASH}" and " d " in since("0-0")


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("console.internal", False), ("localhost.example", False),
])  # fmt: skip
def test_loopback_hosts(host: str, expected: bool) -> None:
    assert loopback(host) is expected


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_beyond_loopback_a_token_is_required() -> None:
    check_access(settings())
    check_access(settings(CONSOLE_HOST="0.0.0.0", CONSOLE_TOKEN="x" * 16))
    with pytest.raises(SettingsError, match=r"^CONSOLE_HOST: 0\.0\.0\.0 is not a loopback"):
        check_access(settings(CONSOLE_HOST="0.0.0.0"))


def test_the_token_is_compared_whole_and_never_shown() -> None:
    token = "a-token-of-some-length"
    access = Access(token)
    assert access.required and access.matches(token)
    for wrong in ("", token[:-1], token + "x", token.upper()):
        assert not access.matches(wrong)
    assert token not in access.session_secret
    assert Access(token).session_secret == access.session_secret  # survives a restart
    assert Access("another-token-entirely").session_secret != access.session_secret
    assert not Access(None).required and not Access(None).matches("")
    assert "a-token" not in repr(settings(CONSOLE_TOKEN=token))


@pytest.mark.parametrize(("target", "expected"), [
    ("/results?request_id=r", "/results?request_id=r"), ("/", "/"),
    ("//evil.example/", "/"), ("/\\evil.example", "/"), ("https://evil.example/", "/"),
    ("", "/"), (None, "/"),
])  # fmt: skip
def test_a_sign_in_leads_only_to_this_console(target: str | None, expected: str) -> None:
    assert local_target(target) == expected


def request_with(**headers: str) -> Request:
    raw = [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw,
                    "query_string": b""})


@pytest.mark.parametrize(("headers", "expected"), [
    ({"host": "console:9110"}, True),  # a script: says nothing
    ({"host": "console:9110", "origin": "http://console:9110"}, True),
    ({"host": "console:9110", "origin": "https://console:9110"}, True),  # behind TLS
    ({"host": "console:9110", "origin": "http://evil.example"}, False),
    ({"host": "console:9110", "origin": "http://console:9111"}, False),
    ({"host": "console:9110", "origin": "null"}, False),
    ({"host": "console:9110", "sec_fetch_site": "same-origin"}, True),
    ({"host": "console:9110", "sec_fetch_site": "same-site"}, False),
    ({"host": "console:9110", "sec_fetch_site": "cross-site"}, False),
])  # fmt: skip
def test_which_posts_are_the_consoles_own(headers: dict[str, str], expected: bool) -> None:
    assert same_origin(request_with(**headers)) is expected


def test_axis_labels_of_a_quarter_scale() -> None:
    chart = hour_chart([("2026-12-03T14:30", 21, 0)], NOW)
    assert [label for _, label in chart.y_ticks] == ["0", "12.5", "25"]
