"""Access to the console, end to end: with CONSOLE_TOKEN nothing but the sign-in form
is shown without it (pages, thumbnails, the overview's refresh and every POST are
refused); the form signs a browser in with an HttpOnly, SameSite session cookie; a
script uses Bearer; a POST without the session's CSRF token, or from another site, is
refused; the headers that keep pages from being framed or sniffed; a bad setup stops
start-up with one line."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from tests.conftest import wait_for
from tests.console.conftest import TOKEN, Stack, console_env
from tests.e2e.conftest import run_cli

PROTECTED = ["/", "/results", "/results?request_id=r", "/dead-letters", "/overview/live",
             "/thumbs/1"]  # fmt: skip


def request(url: str, method: str = "GET", path: str = "/", body: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request, no redirects followed: (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    sent = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    try:
        conn.request(method, path, body=body, headers={**sent, **(headers or {})})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def dead(stack: Stack) -> Stack:
    """Two dead letters in the module's queue (tasks whose segments do not exist)."""
    for i in range(2):
        stack.push_missing("req_access", f"gone_{i}", f"img_shm_{i:032x}")
    stack.wait_records(2, "two failed records")
    wait_for(lambda: stack.client.xlen(f"{{{stack.queue}}}:dead") == 2, what="dead letters")
    return stack


def test_without_the_token_every_page_and_image_is_refused(stack: Stack) -> None:
    for path in PROTECTED:
        status, headers, body = request(stack.url, path=path)
        assert status == 401, (path, status)
        assert headers["www-authenticate"] == "Bearer"
        assert b"records" not in body and stack.queue.encode() not in body
    # A browser navigating is sent to the sign-in form, and comes back after it.
    status, headers, _ = request(stack.url, path="/results?request_id=r",
                                 headers={"Sec-Fetch-Mode": "navigate", "Accept": "text/html"})
    assert status == 303 and headers["location"] == "/signin?next=/results%3Frequest_id%3Dr"
    status, _, body = request(stack.url, path="/static/console.css")
    assert status == 200 and b"--bg" in body  # the sign-in form's own style sheet


def test_without_the_token_no_action_is_taken(dead: Stack) -> None:
    for path, body in (("/dead-letters/replay-all", ""), ("/dead-letters/replay", "id=1-0")):
        status, _, _ = request(dead.url, "POST", path, body)
        assert status == 401
    wrong = {"Authorization": "Bearer not-the-token-at-all!", "Accept": "application/json"}
    status, _, _ = request(dead.url, "POST", "/dead-letters/replay-all", "", wrong)
    assert status == 401
    assert dead.client.xlen(f"{{{dead.queue}}}:dead") == 2


def test_signing_in_through_the_form(stack: Stack, context: BrowserContext) -> None:
    page = context.new_page()
    page.goto(stack.url + "/dead-letters")
    assert page.url == stack.url + "/signin?next=/dead-letters"
    assert page.locator("input[name=token]").get_attribute("type") == "password"
    page.fill("input[name=token]", "a wrong token, long enough")
    page.click("button[type=submit]")
    assert page.locator(".problem").inner_text() == "That is not the token."
    assert page.request.get(stack.url + "/overview/live").status == 401  # not signed in
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(stack.url + "/dead-letters")  # back where it was going
    assert page.locator("h1").inner_text().startswith("Dead letters")
    [cookie] = context.cookies()
    assert cookie["name"] == "returner_console"
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
    assert TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # out of reach of scripts
    # Thumbnails and the overview's refresh are the session's too.
    answer = page.request.get(stack.url + "/overview/live")
    assert answer.status == 200 and "Dead letters" in answer.text()
    # Signing out ends it.
    page.goto(stack.url + "/")
    page.click("form.signout button")
    page.wait_for_url(stack.url + "/signin")
    assert page.request.get(stack.url + "/overview/live").status == 401


def test_a_script_uses_bearer(dead: Stack) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    status, _, body = request(dead.url, headers=bearer)
    assert status == 200
    overview = json.loads(body)
    assert overview["status"]["dead_letters"] == 2 and overview["records"] == 2
    status, _, body = request(dead.url, path="/results?request_id=req_access", headers=bearer)
    assert [r["record"]["image_id"] for r in json.loads(body)["rows"]] == ["gone_1", "gone_0"]
    status, _, body = request(dead.url, "POST", "/dead-letters/replay-all", "", bearer)
    assert status == 200 and json.loads(body) == {"moved": 2, "gone": 0}
    # Their segments still do not exist: they fail again, and are dead letters again.
    wait_for(lambda: dead.client.xlen(f"{{{dead.queue}}}:dead") == 2, what="dead again")


def csrf_of(page: Page) -> str:
    value = page.locator("input[name=csrf]").first.get_attribute("value")
    assert value
    return value


def test_a_post_without_the_sessions_csrf_token_is_refused(dead: Stack, page: Page) -> None:
    page.goto(dead.url + "/dead-letters")
    token = csrf_of(page)
    form = {"headers": {"Origin": dead.url}}
    refused = [
        page.request.post(dead.url + "/dead-letters/replay-all", form={}, **form),
        page.request.post(dead.url + "/dead-letters/replay-all", form={"csrf": "x" + token},
                          **form),
        page.request.post(dead.url + "/dead-letters/replay-all", form={"csrf": token},
                          headers={"Origin": "http://evil.example"}),
        page.request.post(dead.url + "/dead-letters/replay-all", form={"csrf": token},
                          headers={"Sec-Fetch-Site": "cross-site"}),
    ]
    assert [r.status for r in refused] == [403, 403, 403, 403]
    assert "CSRF" in refused[0].text() and "another site" in refused[2].text()
    assert dead.client.xlen(f"{{{dead.queue}}}:dead") == 2


class Attacker(ThreadingHTTPServer):
    """A page of another origin that posts a form to the console when opened."""

    def __init__(self, target: str) -> None:
        page = (f'<form id="f" method="post" action="{target}/dead-letters/replay-all">'
                '<input name="csrf" value="guess"></form>'
                '<script>document.getElementById("f").submit()</script>').encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *_args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def attacker(stack: Stack) -> Iterator[str]:
    server = Attacker(stack.url)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_a_form_posted_from_another_site_is_refused(dead: Stack, page: Page,
                                                    attacker: str) -> None:
    page.goto(attacker)
    page.wait_for_url(dead.url + "/dead-letters/replay-all")
    assert "refused" in page.content()
    assert dead.client.xlen(f"{{{dead.queue}}}:dead") == 2


def test_pages_carry_headers_against_framing_sniffing_and_caching(stack: Stack) -> None:
    status, headers, _ = request(stack.url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert headers["server-timing"].startswith("app;dur=")
    assert "server" not in headers


def test_a_console_without_a_token_serves_loopback_names_only(
    redis_url: str, queue: str, tmp_path: Any, browser: Browser
) -> None:
    from tests.console.conftest import Console

    console = Console(console_env(redis_url, queue, tmp_path / "out"), tmp_path,
                      tmp_path / "console.log").start()
    try:
        assert "loopback only, no token" in console.logs()
        status, _, body = request(console.url)
        assert status == 200 and b"No results store yet" in body
        # A page of a name rebound to 127.0.0.1 does not get to read it.
        status, _, _ = request(console.url, headers={"Host": "rebound.example:80"})
        assert status == 400
        page = browser.new_page()
        page.goto(console.url + "/signin")
        assert page.url == console.url + "/"  # nothing to sign in to
        page.close()
    finally:
        assert console.stop() == 0


def test_a_bad_setup_stops_start_up_with_one_line(redis_url: str, tmp_path: Any) -> None:
    env = console_env(redis_url, "q", tmp_path / "out", CONSOLE_HOST="0.0.0.0")
    done = run_cli("console", env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "returner: bad setting CONSOLE_HOST: 0.0.0.0 is not a loopback address, and without "
        "CONSOLE_TOKEN the console serves on loopback only (set CONSOLE_TOKEN)"]
    short = run_cli("console", env={**env, "CONSOLE_TOKEN": "s3cr3t-short"}, cwd=tmp_path)
    assert short.returncode == 2 and "s3cr3t" not in short.stderr
    assert "CONSOLE_TOKEN" in short.stderr and "at least 16 characters" in short.stderr
    unset = {k: v for k, v in env.items() if k != "REDIS_URL"}
    nothing = run_cli("console", env={**unset, "CONSOLE_HOST": "127.0.0.1"}, cwd=tmp_path)
    assert nothing.returncode == 2 and "REDIS_URL" in nothing.stderr


BLOCK_THE_EXTRA = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"starlette", "uvicorn", "jinja2", "multipart",
                                  "python_multipart", "itsdangerous"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
import returner.cli
sys.argv = ["returner", "console"]
returner.cli.main()
"""


def test_the_core_install_runs_without_the_consoles_packages(redis_url: str,
                                                              tmp_path: Any) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BLOCK_THE_EXTRA],
                          env=console_env(redis_url, "q", tmp_path / "out"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("returner: the console needs its extra: pip install "
                           "'returner[console]'"), line
