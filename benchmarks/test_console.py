"""The console's speed with 10 million records, and what it costs the service.

- **First paint** of each page with 10M records in the store (`harness.history`, a copy
  of the cached store) in Chromium (Debian's, through Playwright), signed in: the
  page's first-contentful-paint (Paint Timing, from the start of the navigation), its
  time to first byte, and the console's own time for it (the Server-Timing header every
  response carries). Each page is loaded once to warm up, then ROUNDS times, pages
  taking turns; medians. SPEC's target: under 300 ms.
- **Search by request id** at the server with 10M records: SEARCHES requests for the
  records of a random request each (`/results?request_id=...`, the page a person
  gets), the console's Server-Timing per request, and the store's query alone
  (`returner.browse.page`) on the same requests. Target: under 50 ms.
- **The service's throughput with the console**, in the same run: one `returner run`
  kept at saturation (BACKLOG 1448x1024 pages always waiting, pushed as it takes them)
  while the console beside it takes turns, in windows of WINDOW_S, between absent (idle:
  nobody asks it anything), open (a client polling the overview's live part every 2 s,
  as the page's script does, and loading a results page with its thumbnails every
  10 s: the operator's browser itself is elsewhere) and flooded (FLOOD_CLIENTS
  connections asking for pages, searches and thumbnails as fast as it answers, from a
  process of their own at nice 10, stopped with SIGSTOP outside its windows), the
  order turned each round, over ROUNDS_SERVICE rounds. The service's frames/s in each
  window (from its records' commit times, the first SETTLE_S left out) and its CPU per
  frame are reported, with each window's ratio to the idle window of its round.
  Target: at least 0.97x with the console open.

Nothing here asserts a speed. Run: .venv/bin/pytest benchmarks/test_console.py
--benchmark-only -s -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from benchmarks import harness
from returner import browse
from returner.store import Store
from tests.conftest import wait_for
from tests.console.conftest import CHROMIUM, CHROMIUM_ARGS, Console, console_env, sign_in

TOKEN = "bench-console-token-0123456789abcdef"
HISTORY = 10_000_000
REQUESTS = HISTORY // 8  # the history has eight images a request
ROUNDS = 7
SEARCHES = 60
ROUNDS_SERVICE = 6  # rounds of one window per variant
WINDOW_S = 8.0  # the console as a variant has it, this long
SETTLE_S = 0.5  # the start of a window is not counted: the change takes effect
BACKLOG = 96  # frames kept waiting, so that the service is always at work
FLOOD_CLIENTS = 8
PAGES = {
    "overview": "/",
    "results (newest)": "/results",
    "results (a request)": "/results?request_id=req_{request}",
    "results (failed only)": "/results?failed=1",
    "results (deep page)": "/results?before=5000000",
    "dead letters": "/dead-letters",
    "sign-in": "/signin",
}


def dead_letters(client: redis.Redis, queue: str, count: int) -> None:
    """Dead letters as settle.lua writes them, for the dead-letters page."""
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(f"{{{queue}}}:dead", {
            "task": b'{"request_id": "req_x", "image_id": "page_%d"}' % i,
            "error": f"shared memory segment 'img_shm_{i:032x}' does not exist",
            "deliveries": "1", "entry_id": f"{i}-0", "consumer": "bench",
            "request_id": "req_x", "image_id": f"page_{i}"})  # fmt: skip
    pipe.execute()


@pytest.fixture(scope="module")
def big_console(bench_redis: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[Console, Path]]:
    """`returner console` over an OUTPUT_DIR with 10M records."""
    client, url = bench_redis
    work = tmp_path_factory.mktemp("console-big")
    out = work / "out"
    harness.history(out, HISTORY)
    queue = f"bench:{uuid.uuid4().hex[:8]}"
    dead_letters(client, queue, 60)
    console = Console(console_env(url, queue, out, CONSOLE_TOKEN=TOKEN),
                      work, work / "console.log").start()
    try:
        yield console, out
    finally:
        console.stop()
        (out / ".results.db").unlink()  # gigabytes: not left for the end of the session


def paint(page: Any, url: str) -> dict[str, float]:
    """Load `url`: its first contentful paint, first byte and the console's own time (ms)."""
    page.goto(url)
    return dict(page.evaluate("""() => new Promise(resolve => {
        const nav = performance.getEntriesByType("navigation")[0];
        const app = (nav.serverTiming || []).find(t => t.name === "app");
        const done = fcp => resolve({fcp, ttfb: nav.responseStart - nav.startTime,
                                     server: app ? app.duration : NaN});
        new PerformanceObserver(list => {
            const found = list.getEntriesByName("first-contentful-paint")[0];
            if (found) done(found.startTime);
        }).observe({type: "paint", buffered: true});
        setTimeout(() => done(NaN), 5000);
    })"""))


def test_first_paint_with_10m_records(benchmark: Any, big_console: tuple[Console, Path],
                                      report: Any) -> None:
    from playwright.sync_api import sync_playwright

    console, _ = big_console
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in PAGES}
    rng = random.Random(1)

    def run() -> None:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 860})
            page = sign_in(context, console.url, TOKEN)
            visitor = browser.new_context().new_page()  # not signed in, for the form
            for round_ in range(ROUNDS + 1):
                for name, path in PAGES.items():
                    url = console.url + path.format(request=rng.randrange(REQUESTS))
                    seen = paint(visitor if name == "sign-in" else page, url)
                    if round_:  # the first round warms up
                        figures[name].append(seen)
            browser.close()

    benchmark.pedantic(run, rounds=1, iterations=1)
    for name, seen in figures.items():
        for key, what in (("fcp", "first paint"), ("ttfb", "first byte"),
                          ("server", "server")):
            values = [s[key] for s in seen]
            report(f"console {what} [{name}, 10M records]", statistics.median(values), "ms",
                   max=max(values), rounds=len(values))
    assert all(len(seen) == ROUNDS for seen in figures.values())


def timed_get(conn: http.client.HTTPConnection, path: str) -> float:
    """The console's own milliseconds for a GET (its Server-Timing header)."""
    conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}",
                                       "Accept": "text/html"})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 200, answer.status
    timing = answer.getheader("server-timing") or ""
    return float(timing.split("dur=", 1)[1])


def test_search_by_request_id_with_10m_records(benchmark: Any,
                                               big_console: tuple[Console, Path],
                                               report: Any) -> None:
    console, out = big_console
    host, port = console.url.split("//", 1)[1].split(":")
    rng = random.Random(2)
    requests = [f"req_{rng.randrange(REQUESTS)}" for _ in range(SEARCHES)]
    others = [f"req_{rng.randrange(REQUESTS)}" for _ in range(SEARCHES)]
    server: list[float] = []
    query: list[float] = []

    def run() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            timed_get(conn, "/results?request_id=req_0")  # warm up the app
            server.extend(timed_get(conn, f"/results?request_id={r}") for r in requests)
        finally:
            conn.close()
        store = Store(out, create=False, read_only=True)
        try:
            for request_id in others:  # requests the console has not just read
                started = time.perf_counter()
                rows = browse.page(store, None, 51, request_id)
                query.append((time.perf_counter() - started) * 1000)
                assert len(rows) == 8
        finally:
            store.close()

    benchmark.pedantic(run, rounds=1, iterations=1)
    for name, values in (("console", server), ("store query", query)):
        ordered = sorted(values)
        report(f"search by request id [{name}, 10M records]", statistics.median(values), "ms",
               p95=ordered[int(len(ordered) * 0.95) - 1], max=ordered[-1], requests=len(values))
    assert len(server) == SEARCHES


# -- the service's throughput beside the console ------------------------------------------

FLOOD = r"""
import http.client, os, random, signal, sys, threading, time
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
clients, top, ids = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
os.nice(10)
paths = ["/overview/live", "/results", "/dead-letters"]
done = [0]
def one():
    rng = random.Random()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    while True:
        pick = rng.random()
        path = (rng.choice(paths) if pick < 0.5 else
                f"/results?request_id=req_{rng.randrange(top)}" if pick < 0.8 else
                f"/thumbs/{rng.randrange(1, ids)}")
        try:
            conn.request("GET", path, headers={"Authorization": "Bearer " + token})
            conn.getresponse().read()
            done[0] += 1
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
def stop(*_):
    print(done[0], flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
for _ in range(clients):
    threading.Thread(target=one, daemon=True).start()
while True:
    time.sleep(1)
"""


class Poller(threading.Thread):
    """What an open overview asks of the console: its live part every 2 s, and a
    results page with its thumbnails every 10 s."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.host, port = url.split("//", 1)[1].split(":")
        self.port, self.stop, self.active = int(port), threading.Event(), threading.Event()
        self.requests = 0

    def get(self, path: str) -> bytes:
        """One GET, on a new connection when the console closed the kept one (it does
        after 5 s idle, as between windows)."""
        for attempt in (1, 2):
            try:
                self.conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
                body = self.conn.getresponse().read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt == 2:
                    raise
        self.requests += 1
        return body

    def run(self) -> None:
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        tick = 0
        while not self.stop.is_set():
            if not self.active.wait(0.1):
                continue
            self.get("/overview/live")
            if tick % 5 == 0:
                page = self.get("/results").decode()
                for record_id in {p.split('"')[0] for p in page.split('src="/thumbs/')[1:]}:
                    self.get(f"/thumbs/{record_id}")
            tick += 1
            self.stop.wait(2.0)
        self.conn.close()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Feeder(threading.Thread):
    """Keeps BACKLOG frames waiting for the service, as a renderer faster than it would."""

    def __init__(self, client: redis.Redis, queue: str, frame: Any) -> None:
        super().__init__(daemon=True)
        self.client, self.queue, self.frame = client, queue, frame
        self.stop = threading.Event()
        self.names: list[str] = []
        self.pushed = 0

    def waiting(self) -> int:
        return int(self.client.llen(self.queue) + self.client.xlen(f"{{{self.queue}}}:stream"))

    def run(self) -> None:
        while not self.stop.is_set():
            if self.waiting() < BACKLOG:
                self.names += harness.push_frames(self.client, self.queue, self.frame, 16,
                                                  prefix=f"img{self.pushed}")
                self.pushed += 16
            else:
                self.stop.wait(0.02)


def windows_of(variants: tuple[str, ...]) -> list[str]:
    """The variants' windows, round by round, the order turned each round."""
    order: list[str] = []
    for round_ in range(ROUNDS_SERVICE):
        order += variants if round_ % 2 == 0 else variants[::-1]
    return order


def rate_in(times: list[float], start: float, end: float) -> float:
    counted = [t for t in times if start + SETTLE_S <= t < end]
    return len(counted) / (end - start - SETTLE_S)


@contextlib.contextmanager
def beside(client: redis.Redis, url: str, tmp: Path, frame: Any
           ) -> Iterator[tuple[harness.Service, Console, Poller, subprocess.Popen[str]]]:
    """The service at saturation, the console over its queue, a poller and a flood
    (both idle: the flood stopped with SIGSTOP)."""
    queue = f"bench:{uuid.uuid4().hex[:8]}"
    out = tmp / "out"
    harness.history(out, 20_000)
    feeder = Feeder(client, queue, frame)
    feeder.start()
    service = harness.Service(url, queue, out).start()
    console = Console(console_env(url, queue, out, CONSOLE_TOKEN=TOKEN), tmp,
                      tmp / "console.log").start()
    host, port = console.url.split("//", 1)[1].split(":")
    poller = Poller(console.url)
    poller.start()
    # Searches of the history's requests, and thumbnails of its records (files elsewhere:
    # a 404) and of the service's own (decoded: the costly ones).
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, host, port, TOKEN,
                              str(FLOOD_CLIENTS), "2500", "45000"], stdout=subprocess.PIPE,
                             text=True)
    flood.send_signal(signal.SIGSTOP)
    try:
        yield service, console, poller, flood
    finally:
        feeder.stop.set()
        feeder.join()
        poller.stop.set()
        poller.join()
        flood.kill()
        flood.wait()
        wait_for(lambda: feeder.waiting() == 0, timeout=120, what="the backlog drained")
        service.stop()
        console.stop()
        harness.release(feeder.names)


def test_service_throughput_beside_the_console(benchmark: Any, bench_redis: Any,
                                               page_frame: Any, tmp_path: Path,
                                               report: Any) -> None:
    client, url = bench_redis
    variants = ("none", "open", "flood")
    # variant, start, end, then the CPU seconds of the service, console and flood in it
    windows: list[tuple[str, float, float, float, float, float]] = []
    flood_served: list[float] = []

    def run() -> None:
        with beside(client, url, tmp_path, page_frame) as (service, console, poller, flood):
            wait_for(lambda: harness.completion_times(service.cwd / "out"), timeout=60,
                     what="the service at work")
            for variant in windows_of(variants):
                if variant == "open":
                    poller.active.set()
                if variant == "flood":
                    flood.send_signal(signal.SIGCONT)
                pids = (service.pid, console.proc.pid, flood.pid)  # type: ignore[union-attr]
                start, before = time.time(), [cpu_s(pid) for pid in pids]
                time.sleep(WINDOW_S)
                spent = [cpu_s(pid) - b for pid, b in zip(pids, before, strict=True)]
                windows.append((variant, start, time.time(), *spent))
                poller.active.clear()
                if variant == "flood":
                    flood.send_signal(signal.SIGSTOP)
            flood.send_signal(signal.SIGCONT)
            flood.send_signal(signal.SIGTERM)
            served = flood.communicate(timeout=30)[0].strip()
            flood_served.append(int(served) / (ROUNDS_SERVICE * WINDOW_S))

    benchmark.pedantic(run, rounds=1, iterations=1)
    times = harness.completion_times(tmp_path / "out")
    seen: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in variants}
    for variant, start, end, cpu, console_cpu, flood_cpu in windows:
        rate = rate_in(times, start, end)
        frames = rate * (end - start - SETTLE_S)
        seen[variant].append((rate, cpu / max(frames, 1) * 1000, console_cpu, flood_cpu))
    for variant, figures in seen.items():
        rates = [f[0] for f in figures]
        report(f"service beside the console [{variant}]", statistics.median(rates), "frames/s",
               windows=[round(r, 1) for r in rates], window_s=WINDOW_S)
        report(f"service cpu beside the console [{variant}]",
               statistics.median(f[1] for f in figures), "ms/frame")
        report(f"console cpu [{variant}]", statistics.median(f[2] for f in figures),
               "s/window", note=f"the console's user+system CPU in a {WINDOW_S:.0f} s window")
        if variant == "flood":
            report("flood client cpu", statistics.median(f[3] for f in figures), "s/window",
                   note="the flooding process's own CPU, on the same machine (nice 10)")
        if variant == "none":
            continue
        # Each window against the window without the console next to it in the same
        # round: neighbours in time, so that the machine's drift cancels out.
        ratios = [f[0] / n[0] for f, n in zip(figures, seen["none"], strict=True)]
        report(f"service with console {variant}/without", statistics.median(ratios), "x",
               rounds=[round(x, 3) for x in ratios])
    report("console answers to the flood", flood_served[0], "requests/s",
           note="over the flood's windows")
    assert all(len(f) == ROUNDS_SERVICE for f in seen.values())
