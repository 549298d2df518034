"""Screenshots of every page of the console, at desktop width and on a phone, for
docs/console.md (`make screenshots` writes them to docs/console/): a running service
with a translated chapter in its store, a few failures and dead letters, and an hour of
history before them.

The hour of history is records written into the store by the test (with their minute
counts, as commits write them), so that the chart shows an hour; everything else on the
pages is the service's own work on frames pushed here.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, StorageState

from benchmarks.conftest import manga_page
from returner.store import Record, Store
from tests.conftest import wait_for
from tests.console.conftest import DESKTOP, PHONE, Stack

CHAPTER = "req_2f9c41"
PAGES = 8


def write_history(stack: Stack, now: datetime) -> int:
    """An hour of earlier records (about 3 a second, a dip, a few failures), oldest
    first, with their minutes; how many."""
    store = Store(stack.output_dir)
    written = 0
    try:
        with store.transaction("screenshots' history") as tx:
            for minute in range(60, 0, -1):
                start = (now - timedelta(minutes=minute)).replace(second=0, microsecond=0)
                done = int(170 + 45 * math.sin(minute / 7) - (110 if 22 <= minute <= 25 else 0))
                failed = 6 if minute in (23, 24) else minute % 17 == 0
                for i in range(done + failed):
                    stamp = (start + timedelta(seconds=i * 59 / (done + failed))).isoformat(
                        timespec="microseconds")
                    ok = i < done
                    tx.insert(Record(stamp, f"req_h{minute:02d}{i // 8:02d}", f"p{i % 8}",
                                     "/srv/earlier.jpg" if ok else None,
                                     "file:///srv/earlier.jpg" if ok else None,
                                     "completed" if ok else "failed",
                                     None if ok else "frame shape does not fit the segment",
                                     None))
                tx.count_minute(start.isoformat(), done, int(failed))
                written += done + failed
    finally:
        store.close()
    return written


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: RETURNER_SCREENSHOTS (`make screenshots` gives
    docs/console), else a temporary directory, so a test run leaves the docs alone."""
    chosen = os.environ.get("RETURNER_SCREENSHOTS")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def shown(stack: Stack) -> Stack:
    stack.push("req_warmup", "warmup")
    stack.wait_records(1, "the store")
    earlier = write_history(stack, datetime.now(UTC))
    for i in range(PAGES):
        stack.push(CHAPTER, f"page_{i + 1:03d}", manga_page(724, 512, seed=i))
    stack.push_missing(CHAPTER, "page_009", "img_shm_" + "9e" * 16, (724, 512, 3))
    for i, request_id in enumerate(("req_31d0b7", "req_31d0b7", "req_c55a02")):
        stack.push_missing(request_id, f"page_{i + 4:03d}", f"img_shm_{i:02x}" + "7c" * 15)
    stack.wait_records(earlier + 1 + PAGES + 4, "the chapter and its failures")
    wait_for(lambda: stack.client.xlen(f"{{{stack.queue}}}:dead") == 4, what="dead letters")
    return stack


def shoot(page: Page, url: str, shots: Path, name: str, wait_images: bool = False) -> None:
    page.goto(url)
    if wait_images:
        page.wait_for_function(
            "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=shots / f"{name}.png", full_page=True)


@pytest.mark.parametrize(("size", "suffix"), [(DESKTOP, ""), (PHONE, "-phone")],
                         ids=["desktop", "phone"])
def test_screenshots_of_every_page(shown: Stack, browser: Browser, signed_in: StorageState,
                                   shots: Path, size: dict[str, int], suffix: str) -> None:
    context = browser.new_context(viewport=size, storage_state=signed_in,  # type: ignore[arg-type]
                                  device_scale_factor=1)
    page = context.new_page()
    try:
        shoot(page, shown.url + "/", shots, f"overview{suffix}")
        assert page.locator("[data-figure=dead] .value").inner_text() == "4"
        shoot(page, f"{shown.url}/results?request_id={CHAPTER}", shots, f"results{suffix}", True)
        assert page.locator(".records .record").count() == PAGES + 1
        shoot(page, shown.url + "/dead-letters", shots, f"dead-letters{suffix}")
        assert page.locator(".letter").count() == 4
    finally:
        context.close()


def test_screenshots_of_the_sign_in_form_and_the_dark_overview(
        shown: Stack, browser: Browser, signed_in: StorageState, shots: Path) -> None:
    context = browser.new_context(viewport=DESKTOP)
    try:
        shoot(context.new_page(), shown.url + "/signin", shots, "signin")
    finally:
        context.close()
    context = browser.new_context(viewport=DESKTOP, storage_state=signed_in,  # type: ignore[arg-type]
                                  color_scheme="dark")
    try:
        shoot(context.new_page(), shown.url + "/", shots, "overview-dark")
    finally:
        context.close()
    assert {p.name for p in shots.glob("*.png")} >= {
        "overview.png", "overview-phone.png", "results.png", "results-phone.png",
        "dead-letters.png", "dead-letters-phone.png", "signin.png", "overview-dark.png"}
