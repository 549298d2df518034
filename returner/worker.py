"""The loop: take a batch, process it on the encoder threads, settle the outcomes.

Processing produces an Outcome and never touches Redis; settling makes outcomes
durable (the results store), releases segments, then acks or dead-letters them in Redis,
each with its event.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from returner.encode import JpegOptions
from returner.errors import DiskError, RedisUnavailable
from returner.metrics import Health, Metrics
from returner.output import Results, discard
from returner.pipeline import Flight, Pipeline
from returner.settings import Settings
from returner.stream import Settlement, Stream
from returner.task import Decision, Entry, Kind, Outcome, Rules, brief

log = logging.getLogger(__name__)
T = TypeVar("T")

WAIT_S = 1.0  # longest block on an empty list: bounds shutdown and claim latency
HEARTBEAT_S = 2.0  # entries in hand are touched this often, so no one claims them
# Entries delivered before (after a crash, or claimed from another consumer) are
# suspects: one of them may be a poison frame that kills the process. They are read
# and processed one at a time, so that a crash counts only against the entry that
# caused it, not against every entry that shared its batch.
SUSPECTS_AT_ONCE = 1
OBSERVE_EVERY_S = 2.0  # queue gauges, and a look for consumers that have gone silent
BACKOFF_MIN_S = 0.1
# Redis is retried at least every 2 s, so a failover (seconds) costs little more than
# itself; a failing disk is retried less eagerly.
REDIS_BACKOFF_MAX_S, DISK_BACKOFF_MAX_S = 2.0, 10.0


@dataclass
class Tally:
    """Settled deliveries by outcome, for summaries."""

    completed: int = 0
    duplicate: int = 0
    failed: int = 0
    dead_lettered: int = 0

    def add(self, kind: Kind) -> None:
        setattr(self, kind.value, getattr(self, kind.value) + 1)

    @property
    def settled(self) -> int:
        return self.completed + self.duplicate + self.failed + self.dead_lettered


def settlement(decision: Decision) -> Settlement:
    """How a decision settles in Redis: its outcome and its event."""
    outcome, kind = decision.outcome, decision.kind
    ok = kind in (Kind.COMPLETED, Kind.DUPLICATE)
    return Settlement(
        outcome.entry,
        kind.value,
        outcome.request_id,
        outcome.image_id,
        str(decision.file_path) if decision.file_path else None,
        None if ok else outcome.error or "failed",
    )


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self.attempt = 0

    def next_delay(self) -> float:
        cap = min(self.max_s, BACKOFF_MIN_S * 2**self.attempt)
        self.attempt += 1
        return random.uniform(cap / 2, cap)


class Stopping(Exception):
    """Raised out of a Redis retry loop when the worker is asked to stop."""


class Worker:
    """One consumer of the group; `run` serves until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        stream: Stream,
        metrics: Metrics,
        stop: threading.Event,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.stream = stream
        self.metrics = metrics
        self.stop = stop
        self.health = health or Health()
        self.results = Results(
            settings.output_dir,
            settings.output_layout,
            settings.results_json_entries,
            settings.results_retention_days,
        )
        rules = Rules(
            re.compile(settings.shm_name_pattern),
            settings.max_pixels,
            settings.channel_order,
            settings.max_task_bytes,
        )
        jpeg = JpegOptions(settings.jpeg_quality, settings.jpeg_subsampling)
        self.pipeline = Pipeline(
            self.results,
            rules,
            jpeg,
            settings.max_deliveries,
            settings.encoder_threads,
        )
        self.tally = Tally()
        stream.on_short_wait = self._short_wait
        self._claim_cursor = "0-0"
        self._claim_due = 0.0
        self._claim_every = min(max(settings.claim_min_idle_ms / 4000, 1.0), 30.0)
        self._observe_due = 0.0
        self._resync = False  # re-read own pending entries once Redis is back

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped: own pending entries first, then new and claimed ones."""
        flights: deque[Flight] = deque()
        try:
            self.start()
            self.recover_own()
            while not self.stop.is_set():
                self.health.tick()
                self.step(flights)
            log.info("asked to stop: finishing the %d batches in hand", len(flights))
            while flights:  # finish and settle everything in hand
                self.land(flights.popleft(), flights)
        except Stopping:
            log.info("stopped while waiting for redis; unsettled entries stay pending")
            self.abandon(flights)
        finally:
            self.close()

    def abandon(self, flights: deque[Flight]) -> None:
        """Drop work that cannot be settled now; it stays pending in Redis."""
        for flight in flights:
            for outcome in self.pipeline.collect(flight, HEARTBEAT_S, lambda _: None):
                discard(outcome.temp_path)

    def start(self) -> None:
        """Load the results and join the group, waiting for Redis as long as it takes."""
        self.results.open()
        self.call_redis(self.stream.ensure_group)
        log.info(
            "consumer %s of group %s on %s, %d encoder threads",
            self.stream.consumer,
            self.stream.group,
            self.stream.keys.stream,
            self.settings.encoder_threads,
        )

    def close(self) -> None:
        self.pipeline.close()
        self.results.close()

    def recover_own(self) -> None:
        """Finish this consumer's own pending entries, left by an earlier run."""
        after = "0"
        while not self.stop.is_set():
            entries, last, _ = self.call_redis(
                partial(self.stream.own_pending, after, SUSPECTS_AT_ONCE)
            )
            for entry in entries:
                log.info(
                    "recovering entry %s of an earlier run (delivery %d)",
                    entry.id,
                    entry.deliveries,
                )
            if entries:
                self.handle(entries)
            if last == after:
                return
            after = last

    @property
    def claim_done(self) -> bool:
        """The last XAUTOCLAIM pass reached the end of the pending list."""
        return self._claim_cursor == "0-0"

    def step(self, flights: deque[Flight]) -> None:
        """Keep two batches in flight: the next one encodes while the last one commits."""
        if self._resync:
            # Redis failed and came back: a read whose reply was lost left entries
            # pending under this consumer that it never saw. Take them up now rather
            # than after CLAIM_MIN_IDLE_MS.
            while flights:
                self.land(flights.popleft(), flights)
            self._resync = False
            self.recover_own()
            return
        if len(flights) < 2:
            batch = self.next_batch(wait=not flights)
            if any(entry.deliveries > 1 for entry in batch):
                while flights:  # a suspect runs alone: nothing else is in hand if it crashes
                    self.land(flights.popleft(), flights)
                self.handle(batch)
                return
            if batch:
                self.health.holding(True)
                flights.append(self.pipeline.submit(batch))
                if len(flights) < 2 or not flights[0].done():
                    return
        if flights:
            self.land(flights.popleft(), flights)

    def land(self, flight: Flight, flights: deque[Flight]) -> None:
        """Settle a finished flight; on a failing disk, drain the rest and retry them all."""
        retry = self.settle(self.collect(flight))
        if retry:
            while flights:
                retry += self.settle(self.collect(flights.popleft()))
            self.handle(retry)
        self.health.holding(bool(flights))

    def next_batch(self, wait: bool = True) -> list[Entry]:
        """Entries of silent consumers, idle claimed ones, or new ones; waits when none."""
        now = time.monotonic()
        if now >= self._observe_due:
            self._observe_due = now + OBSERVE_EVERY_S
            rescued = self.observe()
            if rescued:
                self._observe_due = 0.0  # keep taking over, one suspect at a time
                return rescued
        if now >= self._claim_due:
            claimed = self.claim_idle(self.settings.claim_min_idle_ms)
            if claimed:
                return claimed
        entries = self.call_redis(lambda: self.stream.fetch(self.settings.batch_size))
        if not entries and wait and not self.stop.is_set():
            self.call_redis(lambda: self.stream.wait_for_tasks(WAIT_S))
        return entries

    def observe(self) -> list[Entry]:
        """Update the queue gauges; take over the entries of a crashed consumer, if any.

        Live workers talk to Redis at least every second and touch what they hold
        every HEARTBEAT_S, so a consumer silent for CONSUMER_TIMEOUT_MS is gone: its
        work is recovered in seconds instead of after CLAIM_MIN_IDLE_MS.
        """
        seen = self.call_redis(self.stream.observe)
        self.metrics.queue_length.set(seen.queue_length)
        self.metrics.pending.set(seen.pending)
        self.metrics.oldest_pending.set(seen.oldest_pending_s or 0.0)
        self.metrics.dead_letters.set(seen.dead_letters)
        timeout = self.settings.consumer_timeout_ms
        for c in seen.consumers:
            if c.name == self.stream.consumer or c.idle_ms < timeout:
                continue
            if not c.pending:
                # Gone and holding nothing: leave no trace in the group. The script
                # checks again, since deleting a consumer discards its pending entries.
                if self.call_redis(partial(self.stream.forget, c.name)):
                    log.info(
                        "consumer %s silent for %.0fs and holding nothing: removed",
                        c.name,
                        c.idle_ms / 1000,
                    )
                continue
            entries, gone = self.call_redis(
                partial(self.stream.rescue, c.name, timeout, SUSPECTS_AT_ONCE)
            )
            if entries or gone:
                log.warning(
                    "consumer %s silent for %.1fs: taking over %d entries",
                    c.name,
                    c.idle_ms / 1000,
                    len(entries),
                )
            if entries:
                return entries
        return []

    def claim_idle(self, min_idle_ms: int, count: int = SUSPECTS_AT_ONCE) -> list[Entry]:
        """One XAUTOCLAIM step; schedules the next pass once the cursor wraps."""
        entries, self._claim_cursor, gone = self.call_redis(
            lambda: self.stream.claim(min_idle_ms, self._claim_cursor, count)
        )
        if gone:
            log.warning("%d pending entries had been deleted from the stream; acked", gone)
        if self._claim_cursor == "0-0":
            self._claim_due = time.monotonic() + self._claim_every
        if entries:
            log.info("claimed %d entries idle for %d ms or more", len(entries), min_idle_ms)
        return entries

    def replay_pending(
        self, min_idle_ms: int, limit: int | None, progress: Callable[[int], None]
    ) -> int:
        """Claim every entry idle for `min_idle_ms` (one pass) and settle it; the count claimed.

        `progress` is called with the number claimed so far after each batch.
        """
        claimed = 0
        try:
            self.start()
            while not self.stop.is_set() and (limit is None or claimed < limit):
                entries = self.claim_idle(min_idle_ms)
                claimed += len(entries)
                if entries:
                    self.handle(entries)
                    progress(claimed)
                if self.claim_done:
                    break
        except Stopping:
            log.warning("stopped; unsettled entries stay pending")
        return claimed

    # -- one batch --------------------------------------------------------------------

    def handle(self, batch: Sequence[Entry]) -> None:
        """Process and settle a batch now; pause and retry while the output disk fails."""
        todo = list(batch)
        backoff = Backoff(DISK_BACKOFF_MAX_S)
        self.health.holding(True)
        try:
            while todo:
                todo = self.settle(self.collect(self.pipeline.submit(todo)))
                if todo and not self.pause(todo, backoff):
                    return
        finally:
            self.health.holding(False)

    def collect(self, flight: Flight) -> list[Outcome]:
        """Wait for a flight, touching its unfinished entries so that no one claims them."""

        def waiting(ids: list[str]) -> None:
            self.health.tick()
            with contextlib.suppress(RedisUnavailable):
                self.stream.touch(ids)

        return self.pipeline.collect(flight, HEARTBEAT_S, waiting)

    # -- settling ---------------------------------------------------------------------

    def settle(self, outcomes: list[Outcome]) -> list[Entry]:
        """Commit, release segments, then ack or dead-letter.

        Returns the entries to process again once the output disk works.
        """
        started = time.perf_counter()
        try:
            decisions = self.results.commit(outcomes)
        except DiskError as exc:
            self.metrics.errors.labels(kind="disk").inc()
            log.error("cannot commit results: %s", exc)
            return [o.entry for o in outcomes]
        committed = time.perf_counter()
        self.metrics.stage.labels(stage="commit").observe(committed - started)
        releasing = [
            d.outcome for d in decisions if d.outcome.shm_name and d.kind is not Kind.RETRY
        ]
        freed = self.pipeline.release([o.shm_name for o in releasing])  # type: ignore[misc]
        released = {o.entry.id for o, ok in zip(releasing, freed, strict=True) if ok}
        self._acknowledge(decisions, released)
        self.metrics.stage.labels(stage="ack").observe(time.perf_counter() - committed)
        self.health.progressed()
        return [d.outcome.entry for d in decisions if d.kind is Kind.RETRY and d.outcome.disk_error]

    def _acknowledge(self, decisions: list[Decision], released: set[str]) -> None:
        """Ack or dead-letter every settled decision, with its event, in one script."""
        settling = [d for d in decisions if d.kind is not Kind.RETRY]
        settlements = [settlement(d) for d in settling]
        emitted = self.call_redis(lambda: self.stream.settle(settlements))
        self.metrics.events.inc(emitted)
        for decision in settling:
            self._report(decision, released)
        for decision in decisions:
            outcome = decision.outcome
            if decision.kind is Kind.RETRY and not outcome.disk_error:
                self.metrics.errors.labels(kind="task").inc()
                log.warning(
                    "task %s/%s left pending: %s",
                    brief(outcome.request_id),
                    brief(outcome.image_id),
                    outcome.error,
                )

    def _report(self, decision: Decision, released: set[str]) -> None:
        outcome, kind = decision.outcome, decision.kind
        entry = outcome.entry
        latency = max(0.0, time.time() - entry.millis / 1000)
        self.tally.add(kind)
        self.metrics.tasks.labels(outcome=kind.value).inc()
        if kind is Kind.FAILED and outcome.segment_missing:
            self.metrics.errors.labels(kind="missing_segment").inc()
        self.metrics.duration.observe(latency)
        self.metrics.deliveries.observe(entry.deliveries)
        if kind is Kind.COMPLETED:
            self.metrics.bytes_written.inc(outcome.size)
        for stage, seconds in outcome.timings.items():
            self.metrics.stage.labels(stage=stage).observe(seconds)
        where = f" -> {decision.file_path.name}" if decision.file_path else ""
        why = f": {outcome.error}" if outcome.error else ""
        freed = ", segment released" if entry.id in released else ""
        fields = {
            "request_id": brief(outcome.request_id),
            "image_id": brief(outcome.image_id),
            "entry_id": entry.id,
            "outcome": kind.value,
            "deliveries": entry.deliveries,
            "duration_s": round(latency, 6),
            **{f"{k}_s": round(v, 6) for k, v in outcome.timings.items()},
        }
        ok = kind in (Kind.COMPLETED, Kind.DUPLICATE)
        log.log(
            logging.INFO if ok else logging.WARNING,
            "task %s/%s %s%s%s%s (entry %s)",
            brief(outcome.request_id),
            brief(outcome.image_id),
            kind.value,
            where,
            why,
            freed,
            entry.id,
            extra=fields,
        )

    def pause(self, held: Sequence[Entry], backoff: Backoff) -> bool:
        """Wait out a failing disk, keeping the held entries from being claimed.

        Returns False when stopping: the entries stay pending for the next run.
        """
        delay = backoff.next_delay()
        log.warning("output disk failing; pausing %.1fs with %d entries in hand", delay, len(held))
        self.health.paused = True
        deadline = time.monotonic() + delay
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.health.tick()
                with contextlib.suppress(RedisUnavailable):
                    self.stream.touch([e.id for e in held])
                if self.stop.wait(min(left, HEARTBEAT_S)):
                    return False
        finally:
            self.health.paused = False
        return True

    def _short_wait(self, wanted: int, got: int) -> None:
        self.metrics.short_waits.inc()
        log.warning(
            "WAIT: %d of %d replicas confirmed within %d ms",
            got,
            wanted,
            self.settings.redis_wait_timeout_ms,
        )

    # -- redis with retries -------------------------------------------------------------

    def call_redis(self, action: Callable[[], T]) -> T:
        """Run a Redis action, retrying with backoff until it works.

        Raises Stopping when asked to stop before Redis answered.
        """
        backoff = Backoff(REDIS_BACKOFF_MAX_S)
        while True:
            try:
                result = action()
            except RedisUnavailable as exc:
                self.metrics.errors.labels(kind="redis").inc()
                self.health.tick(redis_ok=False)
                delay = backoff.next_delay()
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
                if self.stop.wait(delay):
                    raise Stopping from None
                continue
            if backoff.attempt:
                self._resync = True
                self.metrics.reconnects.inc()
                log.info("redis answers again")
            self.health.tick(redis_ok=True)
            return result
