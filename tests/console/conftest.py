"""The console end to end: a real Redis, `returner run` and `returner console` as
subprocesses (one of each per test module), and a real browser (Playwright driving
Debian's Chromium; `playwright install` is not needed)."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    StorageState,
    sync_playwright,
)

from returner.embedded import EmbeddedRedis
from returner.producer import task_message
from tests.conftest import Frames, count_records, random_frame, wait_for
from tests.e2e.conftest import Service, base_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
TOKEN = "console-test-token-0123456789abcdef"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
_LISTENING = re.compile(r"console on (http://\S+?)/? ")


class Console:
    """One `returner console` process on a free port; its log goes to a file."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env, self.cwd, self.log = env, cwd, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> Console:
        with open(self.log, "ab") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "returner", "console"],
                                         env=self.env, cwd=self.cwd, stdout=sink, stderr=sink)
        found = wait_for(lambda: _LISTENING.search(self.logs()) or not self.alive(),
                         timeout=30, what="the console to listen")
        assert self.alive(), self.logs()
        self.url = found[1]
        wait_for(lambda: "startup complete" in self.logs(), timeout=30, what="the app to start")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit 10s after SIGTERM:\n{self.logs()}") from None


@dataclass
class Stack:
    """A running service and console over one queue and OUTPUT_DIR."""

    url: str  # the console's
    redis_url: str
    queue: str
    output_dir: Path
    console: Console
    service: Service
    frames: Frames
    client: redis.Redis

    def push(self, request_id: str, image_id: str, frame: np.ndarray | None = None) -> None:
        """A frame in shared memory, as the renderer makes it, and its task."""
        frame = random_frame((48, 34, 3), seed=len(self.frames.names)) if frame is None else frame
        self.client.rpush(self.queue, self.frames.task(frame, request_id, image_id))

    def push_missing(self, request_id: str, image_id: str, name: str,
                     shape: tuple[int, ...] = (48, 34, 3)) -> None:
        """A task whose segment does not exist (yet): it fails, and is dead-lettered."""
        self.client.rpush(self.queue, task_message(name, shape, request_id, image_id))

    def records(self) -> int:
        return count_records(self.output_dir)

    def wait_records(self, count: int, what: str = "the records") -> None:
        wait_for(lambda: self.records() >= count, timeout=30, what=what)


def console_env(redis_url: str, queue: str, output_dir: Path, **extra: Any) -> dict[str, str]:
    """The console's environment; it logs at INFO, since Console waits for its URL there."""
    return base_env(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=output_dir,
                    CONSOLE_PORT=0, LOG_LEVEL="INFO", **extra)


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    """`returner run` and `returner console` (with CONSOLE_TOKEN, unless the module sets
    CONSOLE_WITHOUT_TOKEN) over a fresh queue and OUTPUT_DIR."""
    work = tmp_path_factory.mktemp("console")
    queue, out = f"console:{uuid.uuid4().hex[:10]}", work / "out"
    service = Service(base_env(REDIS_URL=redis_server.url, HOSTING_TASKS_QUEUE=queue,
                               OUTPUT_DIR=out, CONSUMER_NAME="console-e2e", METRICS_PORT=0,
                               ENCODER_THREADS=2), work, work / "service.log")  # fmt: skip
    service.start()
    service.wait_ready()
    token = {} if getattr(request.module, "CONSOLE_WITHOUT_TOKEN", False) else {
        "CONSOLE_TOKEN": TOKEN}
    console = Console(console_env(redis_server.url, queue, out, **token), work,
                      work / "console.log").start()
    frames = Frames()
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield Stack(console.url, redis_server.url, queue, out, console, service, frames, client)
    finally:
        if console.alive():
            console.stop()
        if service.alive():
            service.stop()
        frames.cleanup()
        client.close()
    assert TOKEN not in console.logs(), "the token was logged"


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                          headless=True)
    yield launched
    launched.close()


def sign_in(context: BrowserContext, url: str, token: str = TOKEN) -> Page:
    """A page of `context`, signed in through the form."""
    page = context.new_page()
    page.goto(url + "/")
    assert "/signin" in page.url
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")
    return page


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    made = browser.new_context(viewport=DESKTOP)
    yield made
    made.close()


@pytest.fixture(scope="module")
def signed_in(browser: Browser, stack: Stack) -> StorageState:
    """The cookies of a browser that signed in to the module's console through the form."""
    context = browser.new_context()
    try:
        sign_in(context, stack.url)
        return context.storage_state()
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, signed_in: StorageState) -> Iterator[Page]:
    """A desktop-sized page of a browser signed in to the module's console."""
    context = browser.new_context(viewport=DESKTOP, storage_state=signed_in)
    yield context.new_page()
    context.close()


def errors_of(page: Page) -> Callable[[], list[str]]:
    """What the page's scripts complain about from now on (CSP refusals among them)."""
    seen: list[str] = []
    page.on("console", lambda message: seen.append(message.text)
            if message.type == "error" else None)
    page.on("pageerror", lambda error: seen.append(str(error)))
    return lambda: seen
