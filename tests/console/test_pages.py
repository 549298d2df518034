"""The console's pages in a real browser, over a running service: a search by request
(and image) newest first with thumbnails that load, failed only, keyset paging, the
overview following new work without a reload, and hostile ids rendered as text."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page

from tests.conftest import random_frame, wait_for
from tests.console.conftest import Stack, errors_of

HOSTILE = '<img src=x onerror="window.__pwned=1">"><script>window.__pwned=2</script>'
HOSTILE_DEAD = HOSTILE.replace("__pwned=1", "__pwned=3")  # another id: a dead letter
HOSTILE_REQUEST = "req_<b>bold</b>&amp;"
PAGES = [f"page_{i:03d}" for i in range(6)]
MANY = 57  # more than one page of results (50)


@pytest.fixture(scope="module")
def history(stack: Stack) -> Stack:
    """Records of three requests, a failed one, and a hostile one (completed and dead)."""
    for i, image_id in enumerate(PAGES):
        stack.push("req_pages", image_id, random_frame((140, 100, 3), seed=i))
    for i in range(MANY):
        stack.push("req_many", f"img_{i:03d}")
    stack.push(HOSTILE_REQUEST, HOSTILE)
    stack.push_missing("req_pages", "page_lost", "img_shm_" + "ab" * 16)
    stack.push_missing(HOSTILE_REQUEST, HOSTILE_DEAD, "img_shm_" + "cd" * 16)
    stack.wait_records(len(PAGES) + MANY + 3, "every record")
    return stack


def search(page: Page, url: str, request_id: str = "", image_id: str = "",
           failed: bool = False) -> None:
    """The results of a search, as the search form asks for them."""
    query = {"request_id": request_id, "image_id": image_id, **({"failed": "1"} if failed else {})}
    page.goto(f"{url}/results?{urlencode(query)}")


def follow(page: Page, selector: str) -> None:
    """Click what leads to another page, and wait until that page has loaded whole."""
    with page.expect_navigation():
        page.click(selector)


def shown_ids(page: Page) -> list[str]:
    return page.locator(".records .image-id").all_inner_texts()


def test_a_search_lists_a_requests_images_newest_first_with_thumbnails(
    history: Stack, page: Page
) -> None:
    page.goto(history.url + "/results")
    page.fill("input[name=request_id]", "req_pages")
    follow(page, "form.search button")
    assert page.url.startswith(history.url + "/results?request_id=req_pages")
    assert shown_ids(page) == ["page_lost", *reversed(PAGES)]
    images = page.locator(".records img")
    assert [images.nth(i).get_attribute("alt") for i in range(images.count())] == PAGES[::-1]
    page.wait_for_function(
        "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)", timeout=15_000)
    sizes = page.evaluate("[...document.images].map(i => [i.naturalWidth, i.naturalHeight])")
    assert all(max(w, h) >= 100 for w, h in sizes), sizes  # small frames stay whole
    # The failed image has no thumbnail, and says why.
    lost = page.locator(".record.failed")
    assert lost.locator(".error").inner_text() == (
        f"shared memory segment 'img_shm_{'ab' * 16}' does not exist")
    assert lost.locator("img").count() == 0


def test_a_thumbnail_is_a_small_cached_jpeg_of_a_completed_record(history: Stack,
                                                                   page: Page) -> None:
    search(page, history.url, "req_pages", "page_000")
    src = page.locator(".records img").get_attribute("src")
    assert src is not None
    answer = page.request.get(history.url + src)
    assert answer.status == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.headers["cache-control"].startswith("private, max-age=")
    assert answer.body()[:2] == b"\xff\xd8"
    record_id = int(src.rsplit("/", 1)[1])
    for missing in (record_id + 10_000, 0):
        assert page.request.get(f"{history.url}/thumbs/{missing}").status == 404


def test_one_image_of_a_request_and_failed_only(history: Stack, page: Page) -> None:
    search(page, history.url, "req_pages", "page_003")
    assert shown_ids(page) == ["page_003"]
    search(page, history.url, "", "page_003")
    assert "within its request" in page.locator(".problem").inner_text()
    search(page, history.url, failed=True)
    assert shown_ids(page) == [HOSTILE_DEAD, "page_lost"]
    assert all(t == "FAILED" for t in page.locator(".badge").all_inner_texts())
    search(page, history.url, "req_pages", failed=True)
    assert shown_ids(page) == ["page_lost"]


def test_paging_goes_back_in_keyset_pages_and_returns_to_the_newest(history: Stack,
                                                                    page: Page) -> None:
    search(page, history.url, "req_many")
    first = shown_ids(page)
    assert len(first) == 50 and first[0] == f"img_{MANY - 1:03d}"
    assert page.locator(".pager a", has_text="Newest").count() == 0
    follow(page, ".pager a[rel=next]")
    assert "before=" in page.url and "request_id=req_many" in page.url
    second = shown_ids(page)
    assert first + second == [f"img_{i:03d}" for i in reversed(range(MANY))]
    assert page.locator(".pager a[rel=next]").count() == 0
    follow(page, ".pager a:has-text('Newest')")
    assert shown_ids(page) == first


def test_the_overview_follows_new_work_without_a_reload(history: Stack, page: Page) -> None:
    page.goto(history.url + "/")
    page.evaluate("window.__same_page = true")
    records = page.locator("[data-figure=records] .value")
    before = int(records.inner_text().replace(",", ""))
    assert before == history.records()
    for i in range(4):
        history.push("req_live", f"live_{i}")
    page.wait_for_function(
        "n => document.querySelector('[data-figure=records] .value').textContent.trim() == n",
        arg=f"{before + 4:,}", timeout=15_000)
    assert page.evaluate("window.__same_page") is True
    assert page.locator("#live-state").inner_text() == "live"
    done = page.locator("#hour .aside").inner_text()
    assert f"{before + 4 - 2:,} completed" in done and "2 failed" in done


def test_hostile_ids_are_shown_as_text_and_run_nothing(history: Stack, page: Page) -> None:
    errors = errors_of(page)
    wait_for(lambda: history.client.xlen(f"{{{history.queue}}}:dead") >= 2, what="dead letters")
    search(page, history.url, HOSTILE_REQUEST)
    assert shown_ids(page) == [HOSTILE_DEAD, HOSTILE]
    assert page.locator(".records .request-id").first.inner_text() == HOSTILE_REQUEST
    assert page.locator(".records img").get_attribute("alt") == HOSTILE
    # The results (both records), the dead letter, and the overview's latest errors.
    for url, shown in ((page.url, [HOSTILE, HOSTILE_DEAD]),
                       (history.url + "/dead-letters", [HOSTILE_DEAD]),
                       (history.url + "/", [HOSTILE_DEAD])):
        page.goto(url)
        text = page.locator("main").inner_text()
        assert all(value in text for value in shown), url
        assert page.evaluate("window.__pwned") is None, url
        assert page.locator("img[src=x], b").count() == 0, url
        assert page.locator("script").count() == 1, url  # the console's own
    assert errors() == []  # nothing was even refused by the CSP: it never was markup
