"""Processing deliveries: decide each outcome, encode on the encoder threads, and write
and fsync on the I/O threads, so that waiting on the disk never leaves a core idle.
Nothing here touches Redis."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from returner import frames
from returner.commit import Committer
from returner.encode import JpegOptions, encode
from returner.errors import DiskError, MissingSegment, PermanentError, TransientError
from returner.task import Entry, Kind, Outcome, Rules, brief, name_problem, parse_task, read_ids

log = logging.getLogger(__name__)

IO_THREADS = 4  # fsync waits on the disk, not a core: a few more threads than cores


@dataclass
class Flight:
    """A batch being processed: one future per entry, resolved once its JPEG is durable."""

    entries: list[Entry]
    futures: list[Future[Outcome]]

    def done(self) -> bool:
        return all(f.done() for f in self.futures)


class Pipeline:
    """Encoder threads (one per core by default) feeding I/O threads."""

    def __init__(
        self,
        results: Committer,
        rules: Rules,
        jpeg: JpegOptions,
        max_deliveries: int,
        encoder_threads: int,
    ) -> None:
        self.results, self.rules, self.jpeg = results, rules, jpeg
        self.max_deliveries = max_deliveries
        self.encoders = ThreadPoolExecutor(encoder_threads, thread_name_prefix="encode")
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io")

    def close(self) -> None:
        self.encoders.shutdown(wait=True)
        self.io.shutdown(wait=True)

    def submit(self, entries: Sequence[Entry], retried: bool = False) -> Flight:
        """Process entries (`retried`: again, after the output failed them)."""
        futures: list[Future[Outcome]] = []
        for entry in entries:
            future: Future[Outcome] = Future()
            self.encoders.submit(self._encode_stage, entry, future, retried)
            futures.append(future)
        return Flight(list(entries), futures)

    def collect(
        self, flight: Flight, every_s: float, waiting: Callable[[list[str]], None]
    ) -> list[Outcome]:
        """Wait for a flight; every `every_s` call `waiting` with the IDs still in work."""
        while True:
            _, running = wait(flight.futures, timeout=every_s)
            if not running:
                return [f.result() for f in flight.futures]
            waiting(
                [e.id for e, f in zip(flight.entries, flight.futures, strict=True) if f in running]
            )

    def release(self, shm_names: list[str]) -> list[bool]:
        """Unlink segments on the I/O threads (freeing a frame's pages costs a core ~0.5 ms)."""
        return list(self.io.map(frames.unlink, shm_names))

    def _encode_stage(self, entry: Entry, future: Future[Outcome], retried: bool) -> None:
        try:
            outcome = self.process(entry)
            outcome.retried = retried
            if outcome.data is not None:
                self.io.submit(self._write_stage, outcome, future)
            elif self._may_have_staged(outcome):
                self.io.submit(self._forget_stage, outcome, future)
            else:
                future.set_result(outcome)
        except BaseException as exc:  # never leave a future unresolved
            if not future.done():
                future.set_exception(exc)

    def _write_stage(self, outcome: Outcome, future: Future[Outcome]) -> None:
        assert outcome.data is not None
        started = time.perf_counter()
        try:
            outcome.staged = self.results.output.stage(outcome.data, outcome)
            outcome.kind = Kind.COMPLETED
        except TransientError as exc:  # the output is failing: pause
            outcome.pause(exc)
        except Exception as exc:  # pragma: no cover - an unforeseen fault: stays pending
            log.exception("writing %s failed unexpectedly", outcome.entry.id)
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.data = None
        outcome.timings["write"] = time.perf_counter() - started
        future.set_result(outcome)

    def _may_have_staged(self, outcome: Outcome) -> bool:
        """Whether an earlier delivery may have staged a JPEG this one will not commit."""
        earlier = outcome.entry.deliveries > 1 or outcome.retried
        return earlier and outcome.kind.settles and self.results.output.forgets

    def _forget_stage(self, outcome: Outcome, future: Future[Outcome]) -> None:
        try:
            self.results.output.forget(outcome, outcome.recorded_url)
        except TransientError as exc:  # the output is failing: pause, then again
            outcome.pause(exc)
        except Exception as exc:  # pragma: no cover - an unforeseen fault: stays pending
            log.exception("removing what %s staged before failed unexpectedly", outcome.entry.id)
            outcome.kind, outcome.error = Kind.RETRY, f"{type(exc).__name__}: {exc}"
        future.set_result(outcome)

    def process(self, entry: Entry) -> Outcome:
        """Decide one delivery's outcome; a frame to save comes back encoded in `data`."""
        if len(entry.payload) > self.rules.max_task_bytes:  # not even parsed for its ids
            error = f"message is {len(entry.payload)} bytes, over MAX_TASK_BYTES"
            return Outcome(entry, Kind.FAILED, error=error)
        rid, iid, shm_name = read_ids(entry.payload)
        outcome = Outcome(entry, Kind.RETRY, rid, iid)
        try:
            recorded = self.results.recorded(outcome.key)
        except DiskError as exc:
            outcome.pause(exc)
            return outcome
        if recorded is not None:
            outcome.kind, outcome.shm_name = Kind.DUPLICATE, self._safe(shm_name)
            outcome.recorded_url = recorded[1]
            return outcome
        if entry.deliveries > self.max_deliveries:
            outcome.kind = Kind.DEAD_LETTERED
            outcome.error = f"gave up after {entry.deliveries} deliveries"
            return outcome
        log.info(
            "task %s/%s started (entry %s, delivery %d)",
            brief(rid),
            brief(iid),
            entry.id,
            entry.deliveries,
        )
        try:
            self._load_and_encode(outcome)
        except PermanentError as exc:
            outcome.kind, outcome.error = Kind.FAILED, str(exc)
            outcome.segment_missing = isinstance(exc, MissingSegment)
            outcome.shm_name = outcome.shm_name or self._safe(shm_name)
        except TransientError as exc:
            outcome.error = str(exc)
            if isinstance(exc, DiskError):
                outcome.pause(exc)
        except Exception as exc:  # a bug or an unforeseen fault: leave it pending
            log.exception(
                "task %s/%s: unexpected error; left pending for a retry", brief(rid), brief(iid)
            )
            outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome

    def _load_and_encode(self, outcome: Outcome) -> None:
        started = time.perf_counter()
        task = parse_task(outcome.entry.payload, self.rules)
        outcome.shm_name = task.shm_name

        def encode_frame(frame: frames.Frame) -> tuple[float, bytes]:
            return time.perf_counter(), encode(frame, task.channel_order, self.jpeg)

        loaded, outcome.data = frames.with_frame(task, encode_frame, self.rules.copy_segments)
        outcome.timings = {"load": loaded - started, "encode": time.perf_counter() - loaded}

    def _safe(self, shm_name: str | None) -> str | None:
        """A segment name from an unvalidated message, if it may be unlinked."""
        if shm_name and name_problem(shm_name, self.rules.shm_name_pattern) is None:
            return shm_name
        return None
