"""Per-task cost of committing results against the history the store already holds.

OUTPUT_DIR's store is laid out with 0, 10k, 1M and 10M earlier records, as an upgrade
leaves it (`harness.history`: one generated row per record with SPEC's fields, 1% of
them failed, then the index and the `imported` mark made by `Tx.mark_imported`; the
1M and 10M stores are built once into `.returner/bench-cache/` and copied).

Each store is opened as `returner run` opens it: `Committer.at(dir, ...)` with the service's
default settings (layout, RESULTS_JSON_ENTRIES, RESULTS_RETENTION_DAYS), so its thread
keeps results.json and retention up meanwhile, as in the service; `open()` is timed.
Then the rounds run, the four stores taking turns within each round (in an order that
rotates from round to round), so that the machine's drift (another test suite may be
writing to the same disk) falls on every case alike. A round's setup, untimed, writes
the batch's JPEGs (a real page, about 160 kB) to fsynced temp files with
`OutputDir.write_jpeg`; only `Results.commit(batch)` is timed: one transaction that
looks each task up in the once-only index, picks its file name, inserts its record and
its move, and commits (fsync of the WAL, synchronous=FULL); then the renames and the
directory's fsync. Every task has a random request id, as upstream's are, so each
lookup and insert lands on another page of the index.

Two batch sizes: 32, what a saturated worker commits at once, and 1, each commit
holding one frame, as at low load. The per-task figure is the median batch / size; the
ratio is against the empty store's in the same rounds. The slowest batch is reported
too: a stall (another transaction holding the store's write lock) shows there and not
in the median.
"""

from __future__ import annotations

import shutil
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import simplejpeg

from benchmarks import harness
from benchmarks.conftest import Frame, report
from returner import upgrade
from returner.commit import Committer
from returner.settings import Settings
from returner.task import Entry, Kind, Outcome
from tests.conftest import count_records

pytestmark = pytest.mark.bench

CASES = {"0": 0, "10k": 10_000, "1M": 1_000_000, "10M": 10_000_000}  # name: earlier records
ROUNDS = {32: 15, 1: 40}  # batch size: timed rounds (after one untimed round)
BASE_MILLIS = 1_795_000_000_000  # the stream entries' time: 2026-11-18


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """An OUTPUT_DIR per case, shared by both batch sizes (a few hundred records more
    change nothing); the 10M one is 1.7 GB, removed at the end."""
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for case, earlier in CASES.items():
        started = time.perf_counter()
        harness.history(root / case, earlier)
        report(f"commit.lay_out[{case}]", time.perf_counter() - started, "s",
               note="build the store, or copy and fsync the cached one")
        made[case] = root / case
    yield made
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def page_jpeg(page_frame: Frame) -> bytes:
    """The benchmark page as the service encodes it (q80, 4:2:0)."""
    data: bytes = simplejpeg.encode_jpeg(page_frame, quality=80, colorsubsampling="420")
    return data


def service_results(directory: Path) -> Committer:
    """The results as `returner run` makes them with the default settings."""
    defaults = {name: spec.default for name, spec in Settings.model_fields.items()}
    return Committer.at(directory, defaults["output_layout"], defaults["results_json_entries"],
                        defaults["results_retention_days"])


@dataclass
class Case:
    """One store, opened, and the batches committed to it."""

    results: Committer
    jpeg: bytes
    count: int = 0
    times: list[float] = field(default_factory=list)  # seconds per timed batch
    last: list[str] = field(default_factory=list)  # the last batch's image ids

    def batch(self, size: int) -> list[Outcome]:
        outcomes = []
        for _ in range(size):
            i = self.count
            self.count += 1
            entry = Entry(f"{BASE_MILLIS + i}-0", b"{}", 1)
            outcome = Outcome(entry, Kind.COMPLETED, uuid.uuid4().hex, f"img_{i}")
            outcome.staged = self.results.output.stage(self.jpeg)
            outcomes.append(outcome)
        self.last = [o.image_id or "" for o in outcomes]
        return outcomes

    def commit(self, size: int, timed: bool) -> None:
        outcomes = self.batch(size)
        started = time.perf_counter()
        decisions = self.results.commit(outcomes)
        elapsed = time.perf_counter() - started
        assert all(d.kind is Kind.COMPLETED for d in decisions)
        if timed:
            self.times.append(elapsed)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("batch", list(ROUNDS))
def test_commit(benchmark: Any, stores: dict[str, Path], page_jpeg: bytes, batch: int) -> None:
    before = {name: count_records(directory) for name, directory in stores.items()}
    cases: dict[str, Case] = {}
    opens: dict[str, float] = {}

    def run() -> None:
        for name, directory in stores.items():
            results = service_results(directory)
            started = time.perf_counter()
            upgrade.take_over(results.out, results.store)
            results.open()
            opens[name] = time.perf_counter() - started
            cases[name] = Case(results, page_jpeg)
        order = list(cases)
        for round_ in range(ROUNDS[batch] + 1):
            for name in order[round_ % len(order):] + order[: round_ % len(order)]:
                cases[name].commit(batch, timed=round_ > 0)

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        for case in cases.values():
            case.results.close()
    # Every batch is recorded, and the last one's JPEGs are under their final names.
    for name, case in cases.items():
        assert count_records(stores[name]) == before[name] + case.count
        for image_id in case.last:
            assert list(stores[name].glob(f"{image_id}_*.jpg")), image_id

    base = statistics.median(cases["0"].times) / batch
    for name, case in cases.items():
        where = f"{name}, batch {batch}"
        per_task = statistics.median(case.times) / batch
        report(f"commit.open[{where}]", opens[name] * 1000, "ms", earlier=CASES[name],
               note="Results.open() of a store already imported")
        report(f"commit.per_task[{where}]", per_task * 1000, "ms/task", earlier=CASES[name],
               batches=len(case.times), slowest_batch_ms=max(case.times) * 1000,
               jpeg_bytes=len(page_jpeg))
        if name != "0":
            report(f"commit.per_task_ratio[{name}/0, batch {batch}]", per_task / base, "x",
                   note=f"same rounds, batch of {batch}")
