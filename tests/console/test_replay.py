"""Replay from the dead-letters page, end to end: tasks dead-lettered because their
segment did not exist yet are replayed once it does (one, then all), the page says what
it did, and the running service completes them; a replay of a dead letter that is gone
meanwhile says so; "Replay all" asks first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Dialog, Page

from tests.conftest import random_frame, read_results, upstream_segment, wait_for
from tests.console.conftest import Stack
from tests.e2e.conftest import base_env, run_cli

SHAPE = (60, 44, 3)
IMAGES = [f"late_{i}" for i in range(4)]


def segment_name(image_id: str) -> str:
    return "img_shm_" + image_id.encode().hex().ljust(32, "0")


def completed(stack: Stack) -> set[str]:
    return {r["image_id"] for r in read_results(stack.output_dir)
            if r["request_id"] == "req_late" and r["status"] == "completed"}


def dead_count(stack: Stack) -> int:
    return int(stack.client.xlen(f"{{{stack.queue}}}:dead"))


@pytest.fixture(scope="module")
def late(stack: Stack) -> Iterator[Stack]:
    """Tasks pushed before their segments existed (dead letters), whose segments then
    appear, as a renderer that pushes too early would leave them."""
    for image_id in IMAGES:
        stack.push_missing("req_late", image_id, segment_name(image_id), SHAPE)
    wait_for(lambda: dead_count(stack) == len(IMAGES), what="the dead letters")
    for i, image_id in enumerate(IMAGES):
        frame = random_frame(SHAPE, seed=i)
        segment = upstream_segment(frame.nbytes, segment_name(image_id))
        segment.buf[: frame.nbytes] = frame.tobytes()
        segment.close()
        stack.frames.names.append(segment_name(image_id))
    yield stack


def letter(page: Page, image_id: str):  # type: ignore[no-untyped-def]
    return page.locator(".letter", has=page.locator(".image-id", has_text=image_id))


def test_replay_one_from_the_page_and_it_completes(late: Stack, page: Page) -> None:
    page.goto(late.url + "/dead-letters")
    assert page.locator("h1 .count").inner_text() == str(len(IMAGES))
    with page.expect_navigation():
        letter(page, "late_1").locator("button", has_text="Replay").click()
    notice = page.locator(".notice.ok").inner_text()
    assert notice == (f"Moved 1 dead letter back into {{{late.queue}}}:stream; "
                      "the workers retry them.")
    wait_for(lambda: completed(late) == {"late_1"}, what="late_1 completed")
    page.goto(late.url + "/dead-letters")
    assert letter(page, "late_1").count() == 0 and letter(page, "late_0").count() == 1
    assert page.locator(".notice").count() == 0  # said once


def test_replaying_a_dead_letter_gone_meanwhile_says_so(late: Stack, page: Page) -> None:
    page.goto(late.url + "/dead-letters")
    stale = letter(page, "late_2")
    env = base_env(REDIS_URL=late.redis_url, HOSTING_TASKS_QUEUE=late.queue)
    done = run_cli("replay", "--dead-letter", "--limit", "1", env=env, cwd=late.output_dir.parent)
    assert done.returncode == 0 and "moved 1 dead letters" in done.stdout  # the oldest: late_0
    wait_for(lambda: "late_0" in completed(late), what="late_0 completed")
    letter(page, "late_0").locator("button").click()
    page.wait_for_selector(".notice")
    assert page.locator(".notice.error").inner_text() == (
        "Nothing replayed: already gone (replayed elsewhere).")
    assert stale.count() == 1


def test_replay_all_asks_first_then_replays_every_one(late: Stack, page: Page) -> None:
    page.goto(late.url + "/dead-letters")
    left = dead_count(late)
    assert left == 2
    questions: list[str] = []

    def answer(accept: bool):  # type: ignore[no-untyped-def]
        def handle(dialog: Dialog) -> None:
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        return handle

    page.once("dialog", answer(False))
    page.click("button:has-text('Replay all')")
    assert questions == ["Move all 2 dead letters back into the stream for another try?"]
    assert dead_count(late) == 2 and page.url == late.url + "/dead-letters"

    page.once("dialog", answer(True))
    with page.expect_navigation():
        page.click("button:has-text('Replay all')")
    assert page.locator(".notice.ok").inner_text().startswith("Moved 2 dead letters back")
    wait_for(lambda: completed(late) == set(IMAGES), what="every late task completed")
    page.goto(late.url + "/dead-letters")
    assert page.locator(".empty").inner_text() == "No dead letters."
    assert page.locator("button:has-text('Replay all')").count() == 0
