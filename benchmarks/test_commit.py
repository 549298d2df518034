"""Per-task cost of committing results against the history OUTPUT_DIR already holds.

The history is laid out as the service leaves it with RESULTS_MAX_ENTRIES=100000 (the
default): N earlier entries are N // 100000 rotated files `results.<YYYYMMDDTHHMMSS>.json`
of 100,000 entries each plus a results.json holding the remainder (so 100k and 1M
earlier entries mean a fresh results.json, as right after a rotation), in the service's
format: a JSON array, one entry per line, with SPEC's fields (1% of them failed).
The worst case is a results.json holding 99,936 entries: the next batch of 32 brings it
to 99,968, about the largest file a commit rewrites (at 100,000 it rotates at once).

Each round starts from the same state: results.json is put back, a fresh
`ResultsLog(OutputDir(dir), 100000).open()` loads everything (and sweeps the previous
round's JPEGs, now orphans), and 32 outcomes are prepared, each a completed task with
a ~1 MB JPEG in a fsynced temp file written by `OutputDir.write_jpeg`. None of that is
timed; only `ResultsLog.commit(batch)` is: rename 32 JPEGs, rewrite results.json,
fsync it and the directory. The per-task figure is the batch median / 32; the ratio is
against the 0 case of the same run. The open() of the 1M history is reported too.

Such a first commit after open() writes results.json whole. A running service writes
the next version ahead after every commit (from 256 KiB of entries), so the worst case
is also measured that way: each round's setup commits one task first and waits until
the next version is written ahead; the timed commit then appends its 32 entries to it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg

from benchmarks.conftest import median_s, report
from returner.output import OutputDir, ResultsLog, file_name
from returner.task import Entry, Kind, Outcome

pytestmark = pytest.mark.bench

MAX_ENTRIES = 100_000
BATCH = 32
ROUNDS, WARMUP = 10, 1
WORST = MAX_ENTRIES - 2 * BATCH  # 99,936: this batch leaves results.json just short of full
CASES = {  # name: earlier entries
    "0": 0,
    "10k": 10_000,
    "100k": 100_000,
    "1M": 1_000_000,
    "worst_99936_in_results_json": WORST,
    "worst_99936_written_ahead": WORST,
}
WRITTEN_AHEAD = {"worst_99936_written_ahead"}
BASE_MILLIS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the history's first entry
_per_task_s: dict[str, float] = {}  # this run's figures, for the ratios


def _lines(start: int, count: int, output_dir: str) -> list[str]:
    """`count` results entries, numbered from `start`, as json.dumps writes them."""
    lines = []
    for i in range(start, start + count):
        secs = i // 10  # ten tasks a second
        day, rest = divmod(secs, 86_400)
        hh, rest = divmod(rest, 3600)
        mm, ss = divmod(rest, 60)
        stamp = f"2026-01-{1 + day % 28:02d}T{hh:02d}:{mm:02d}:{ss:02d}.{(i % 10) * 100_000:06d}"
        ids = f'"timestamp": "{stamp}+00:00", "request_id": "req_{i}", "image_id": "page_{i}"'
        if i % 100 == 99:
            lines.append(
                f'{{{ids}, "file_path": null, "status": "failed", '
                f'"error": "shared memory segment \'img_shm_{i:x}\' does not exist"}}'
            )
        else:
            name = f"page_{i}_202601{1 + day % 28:02d}_{hh:02d}{mm:02d}{ss:02d}.jpg"
            lines.append(
                f'{{{ids}, "file_path": "{output_dir}/{name}", "status": "completed"}}'
            )
    return lines


def _document(lines: list[str]) -> bytes:
    return ("[\n" + ",\n".join(lines) + "\n]\n").encode() if lines else b"[]\n"


@dataclass
class History:
    """Pre-built files: rotated archives (shared by hard links) and results.json bodies."""

    root: Path
    rotated: list[Path] = field(default_factory=list)
    current: dict[int, bytes] = field(default_factory=dict)  # remainder -> results.json

    def lay_out(self, directory: Path, earlier: int) -> bytes:
        """Put `earlier` entries in `directory`; returns results.json's bytes."""
        directory.mkdir(parents=True, exist_ok=True)
        for path in self.rotated[: earlier // MAX_ENTRIES]:
            target = directory / path.name
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
        body = self.current[earlier % MAX_ENTRIES]
        (directory / "results.json").write_bytes(body)
        return body


@pytest.fixture(scope="session")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    """1M entries in 10 rotated files, and the results.json bodies; built once a session."""
    started = time.perf_counter()
    root = tmp_path_factory.mktemp("history")
    made = History(root)
    out = "/srv/returner/output"
    for n in range(max(CASES.values()) // MAX_ENTRIES):
        path = root / f"results.202601{n + 1:02d}T000000.json"
        path.write_bytes(_document(_lines(n * MAX_ENTRIES, MAX_ENTRIES, out)))
        made.rotated.append(path)
    top = len(made.rotated) * MAX_ENTRIES  # results.json entries follow the archives'
    for earlier in CASES.values():
        rest = earlier % MAX_ENTRIES
        made.current.setdefault(rest, _document(_lines(top, rest, out)))
    report("commit.history_build_time", time.perf_counter() - started, "s")
    return made


@pytest.fixture(scope="module")
def jpeg_1mb() -> bytes:
    """A real JPEG of about 1 MB (grainy content, so it stays large at q80)."""
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, (1448, 1024, 3), dtype=np.uint8)
    data: bytes = simplejpeg.encode_jpeg(frame, quality=80, colorsubsampling="420")
    return data


@dataclass
class Rounds:
    """Sets each round up from the same state and keeps what the setups measured."""

    directory: Path
    body: bytes
    jpeg: bytes
    tag: str
    ahead: bool = False
    log: ResultsLog | None = None
    opens: list[float] = field(default_factory=list)
    count: int = 0

    def setup(self) -> tuple[tuple[ResultsLog, list[Outcome]], dict[str, Any]]:
        self.teardown()
        (self.directory / "results.json").write_bytes(self.body)
        log = ResultsLog(OutputDir(self.directory), MAX_ENTRIES)
        started = time.perf_counter()
        log.open()  # also sweeps the JPEGs the previous round committed
        self.opens.append(time.perf_counter() - started)
        self.log = log
        if self.ahead:
            log.commit(self._outcomes(log, 1))
            assert log._draft is not None
            log._draft.fd.result()  # the next results.json is written ahead
        return (log, self._outcomes(log, BATCH)), {}

    def _outcomes(self, log: ResultsLog, count: int) -> list[Outcome]:
        outcomes = []
        for _ in range(count):
            i = self.count
            self.count += 1
            entry = Entry(f"{1795000000000 + i}-0", b"{}", 1)
            outcome = Outcome(entry, Kind.COMPLETED, f"bench_{self.tag}_{i}", f"img_{i}")
            outcome.temp_path = log.out.write_jpeg(self.jpeg)
            outcome.size = len(self.jpeg)
            outcomes.append(outcome)
        return outcomes

    def teardown(self, *_: Any) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def _commit(log: ResultsLog, outcomes: list[Outcome]) -> None:
    log.commit(outcomes)


@pytest.fixture
def case_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "out"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)  # up to 300 MB of history per case


@pytest.mark.parametrize("case", list(CASES))
def test_commit(benchmark: Any, history: History, jpeg_1mb: bytes, case_dir: Path,
                case: str) -> None:
    earlier = CASES[case]
    ahead = case in WRITTEN_AHEAD
    rounds = Rounds(case_dir, history.lay_out(case_dir, earlier), jpeg_1mb, case, ahead)
    try:
        benchmark.pedantic(_commit, setup=rounds.setup, teardown=rounds.teardown,
                           rounds=ROUNDS, warmup_rounds=WARMUP)
        # The last round's batch is durable: 32 more entries, their JPEGs under final names.
        body = (case_dir / "results.json").read_bytes()
        assert body.count(b"\n{") == earlier % MAX_ENTRIES + ahead + BATCH
        last = rounds.count - 1
        assert (case_dir / file_name(f"img_{last}", 1795000000000 + last)).exists()
        assert not list(case_dir.glob(".*.tmp"))
    finally:
        rounds.teardown()

    open_s = statistics.median(rounds.opens)
    report(f"commit.open[{case}]", open_s * 1000, "ms", earlier=earlier,
           note="ResultsLog.open(), median of the rounds' setups")
    batch = median_s(benchmark)
    if batch is None:
        return
    per_task = batch / BATCH
    _per_task_s[case] = per_task
    report(f"commit.per_task[{case}]", per_task * 1000, "ms/task", earlier=earlier,
           batch_ms=batch * 1000, jpeg_bytes=len(jpeg_1mb),
           results_json_entries=earlier % MAX_ENTRIES, rotated_files=earlier // MAX_ENTRIES)
    base = _per_task_s.get("0")
    if base and case != "0":
        report(f"commit.per_task_ratio[{case}/0]", per_task / base, "x",
               note="same run, batch of 32")
