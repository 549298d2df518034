"""The loop: take a batch, process it on the encoder threads, settle the outcomes.

Processing produces an Outcome and never touches Redis (pipeline.py); settling makes
outcomes durable, releases segments, then acks or dead-letters them, each with its
event (settle.py). This module decides what to take next: this consumer's own pending
entries after a restart, the entries of consumers that went silent, idle entries of
anyone, then new ones.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

from returner import relay, upgrade
from returner.commit import Committer
from returner.encode import JpegOptions
from returner.errors import RedisUnavailable, TransientError
from returner.metrics import Health, Metrics
from returner.pipeline import Flight, Pipeline
from returner.retry import OUTPUT_BACKOFF_MAX_S, Backoff, RedisCalls, Stopping
from returner.settings import Settings
from returner.settle import Settler, Tally
from returner.stream import Consumer, ConsumerInfo
from returner.task import Entry, Outcome, Rules

log = logging.getLogger(__name__)

WAIT_S = 1.0  # longest block on an empty list: bounds shutdown and claim latency
HEARTBEAT_S = 2.0  # entries in hand are touched this often, so no one claims them
# Entries delivered before (after a crash, or claimed from another consumer) are
# suspects: one of them may be a poison frame that kills the process. They are read
# and processed one at a time, so that a crash counts only against the entry that
# caused it, not against every entry that shared its batch.
SUSPECTS_AT_ONCE = 1
SURVEY_EVERY_S = 2.0  # queue gauges, and a look for consumers that have gone silent
IN_FLIGHT = 2  # batches in hand: the next one encodes while the last one commits
FAILING = {"disk": "output disk", "object_store": "object store"}


class Worker:
    """One consumer of the group; `run` serves until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        metrics: Metrics,
        stop: threading.Event,
        health: Health | None = None,
    ) -> None:
        self.settings, self.consumer, self.stream = settings, consumer, consumer.stream
        self.metrics, self.stop = metrics, stop
        self.health = health or Health()
        self.redis = RedisCalls(stop, metrics, self.health)
        self.results = Committer.from_settings(settings)
        rules = Rules(
            re.compile(settings.shm_name_pattern),
            settings.max_pixels,
            settings.channel_order,
            settings.max_task_bytes,
            settings.segment_read == "copy",
        )
        jpeg = JpegOptions(settings.jpeg_quality, settings.jpeg_subsampling)
        self.pipeline = Pipeline(
            self.results, rules, jpeg, settings.max_deliveries, settings.encoder_threads
        )
        self.settler = Settler(
            self.results, consumer, self.pipeline.release, self.redis, metrics, self.health
        )
        self.stream.on_short_wait = self._short_wait
        self._caught_up = 0  # Redis outages whose lost replies were looked for
        self._claim_cursor = "0-0"
        self._claim_due = 0.0
        self._claim_every = min(max(settings.claim_min_idle_ms / 4000, 1.0), 30.0)
        self._survey_due = 0.0
        self._drained = False  # the last fetch took all the list held
        self.relay: relay.ListRelay | None = None

    @property
    def tally(self) -> Tally:
        return self.settler.tally

    def run(self) -> None:
        """Serve until stopped: own pending entries first, then new and claimed ones."""
        flights: deque[Flight] = deque()
        try:
            self.start()
            self.recover_own()
            while not self.stop.is_set():
                self.health.tick()
                if self.redis.outages != self._caught_up:
                    self.catch_up(flights)
                else:
                    self.step(flights)
            log.info("asked to stop: finishing the %d batches in hand", len(flights))
            self.land(flights, everything=True)
        except Stopping:
            log.info("stopped while waiting for redis; unsettled entries stay pending")
            self.abandon(flights)
        finally:
            self.close()

    def step(self, flights: deque[Flight]) -> None:
        """Keep IN_FLIGHT batches in hand: the next one encodes while the last commits."""
        # Below saturation the last fetch emptied the list: land what is in hand rather
        # than ask again (an empty fetch is a round trip and a wake-up per frame).
        if len(flights) < IN_FLIGHT and not (flights and self._drained):
            batch = self.next_batch(wait=not flights)
            if any(entry.deliveries > 1 for entry in batch):
                self.land(flights, everything=True)  # a suspect runs alone
                self.handle(batch)
                return
            if batch:
                self.health.holding(True)
                flights.append(self.pipeline.submit(batch))
                if len(flights) < IN_FLIGHT or not flights[0].done():
                    return
        if flights:
            self.land(flights)

    def catch_up(self, flights: deque[Flight]) -> None:
        """Redis failed and came back: a read whose reply was lost left entries pending
        under this consumer that it never saw. Take them up now, rather than after
        CLAIM_MIN_IDLE_MS."""
        self.land(flights, everything=True)
        self._caught_up = self.redis.outages
        self.recover_own()

    def land(self, flights: deque[Flight], everything: bool = False) -> None:
        """Settle the oldest flight (every flight, with `everything`). Entries whose
        output failed are tried again after a pause, once the rest in hand is settled."""
        paused: list[Outcome] = []
        while flights:
            paused += self.settler.settle(self.collect(flights.popleft()))
            if not (everything or paused):
                break
        if paused:
            self.handle([o.entry for o in paused], retried=True)
        self.health.holding(bool(flights))

    def abandon(self, flights: deque[Flight]) -> None:
        """Drop work that cannot be settled now; it stays pending in Redis."""
        for flight in flights:
            for outcome in self.pipeline.collect(flight, HEARTBEAT_S, lambda _: None):
                if outcome.staged is not None:
                    self.results.output.discard(outcome.staged)

    def start(self) -> None:
        """Check the output, take over an earlier version's results, open them, and join
        the group, waiting for Redis as long as it takes. Raises SettingsError (an
        output that can never work) or DiskError."""
        try:
            self.results.output.check()
        except TransientError as exc:  # usable later: uploads pause until it answers
            log.warning("%s; starting anyway: uploads pause until it answers", exc)
        upgrade.take_over(self.results.out, self.results.store)
        self.results.open()
        self.redis(self.stream.ensure_group)
        self._route_result_lists()
        log.info(
            "consumer %s of group %s on %s, %d encoder threads",
            self.consumer.name,
            self.stream.group,
            self.stream.keys.stream,
            self.settings.encoder_threads,
        )

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.pipeline.close()
        self.results.close()

    def _route_result_lists(self) -> None:
        s = self.settings
        self.relay = relay.route(self.consumer, s.success_queue, s.error_queue, s.events_maxlen)
        if self.relay is not None:
            self.redis(self.relay.start)
            log.info("relaying %s from the events", ", ".join(self.relay.lists.values()))

    def next_batch(self, wait: bool = True) -> list[Entry]:
        """Entries of silent consumers, idle claimed ones, or new ones; with `wait`, once
        the list was found empty, first waits for it to hold one (up to WAIT_S)."""
        now = time.monotonic()
        if now >= self._survey_due:
            self._survey_due = now + SURVEY_EVERY_S
            rescued = self.survey()
            if rescued:
                self._survey_due = 0.0  # keep taking over, one suspect at a time
                return rescued
        if now >= self._claim_due:
            claimed = self.claim_idle(self.settings.claim_min_idle_ms)
            if claimed:
                return claimed
        if self.relay is not None and self.relay.behind:  # the event cap could trim its events
            log.warning("result lists' relay is %d events behind; waiting", self.relay.lag)
            self.stop.wait(WAIT_S)
            return []
        if wait and self._drained and not self.stop.is_set():
            self.redis(lambda: self.consumer.wait_for_tasks(WAIT_S))
        entries = self.redis(lambda: self.consumer.fetch(self.settings.batch_size))
        self._drained = len(entries) < self.settings.batch_size
        return entries

    def recover_own(self) -> None:
        """Finish this consumer's own pending entries, left by an earlier run."""
        after = "0"
        while not self.stop.is_set():
            entries, last, _ = self.redis(
                partial(self.consumer.own_pending, after, SUSPECTS_AT_ONCE)
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

    def survey(self) -> list[Entry]:
        """Look at the queue: update its gauges, remove consumers gone silent holding
        nothing, and take over the entries of one gone silent holding some.

        Live workers talk to Redis at least every second and touch what they hold
        every HEARTBEAT_S, so a consumer silent for CONSUMER_TIMEOUT_MS is gone: its
        work is recovered in seconds instead of after CLAIM_MIN_IDLE_MS.
        """
        seen = self.redis(self.stream.observe)
        self.metrics.observed(seen)
        timeout = self.settings.consumer_timeout_ms
        for c in seen.consumers:
            if c.name == self.consumer.name or c.idle_ms < timeout:
                continue
            if not c.pending:
                self._forget(c)
                continue
            entries, gone = self.redis(
                partial(self.consumer.rescue, c.name, timeout, SUSPECTS_AT_ONCE)
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

    def _forget(self, silent: ConsumerInfo) -> None:
        # Gone and holding nothing: leave no trace in the group. The script checks
        # again, since deleting a consumer discards its pending entries.
        if self.redis(partial(self.stream.forget, silent.name)):
            log.info(
                "consumer %s silent for %.0fs and holding nothing: removed",
                silent.name,
                silent.idle_ms / 1000,
            )

    def claim_idle(self, min_idle_ms: int, count: int = SUSPECTS_AT_ONCE) -> list[Entry]:
        """One XAUTOCLAIM step; schedules the next pass once the cursor wraps."""
        entries, self._claim_cursor, gone = self.redis(
            lambda: self.consumer.claim(min_idle_ms, self._claim_cursor, count)
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
        """Claim every entry idle for `min_idle_ms` (one pass, at most `limit`) and settle
        it, then leave the group if holding nothing; the count claimed. `progress` is
        called with the number claimed so far after each batch. Raises ReturnerError."""
        claimed = 0
        try:
            self.start()
            while not self.stop.is_set() and (limit is None or claimed < limit):
                entries = self.claim_idle(min_idle_ms)
                claimed += len(entries)
                if entries:
                    self.handle(entries)
                    progress(claimed)
                if self._claim_cursor == "0-0":
                    break
        except Stopping:
            log.warning("stopped; unsettled entries stay pending")
        finally:
            self.close()
        self.stream.forget(self.consumer.name)  # a replayer holding nothing leaves no trace
        return claimed

    def handle(self, batch: Sequence[Entry], retried: bool = False) -> None:
        """Process and settle a batch now (`retried`: the output failed it before); pause
        and retry while the output fails."""
        todo = list(batch)
        backoff = Backoff(OUTPUT_BACKOFF_MAX_S)
        self.health.holding(True)
        try:
            while todo:
                paused = self.settler.settle(self.collect(self.pipeline.submit(todo, retried)))
                todo, retried = [o.entry for o in paused], True
                if paused and not self.pause(todo, backoff, paused[0].failing):
                    return
        finally:
            self.health.holding(False)

    def collect(self, flight: Flight) -> list[Outcome]:
        """Wait for a flight, touching its unfinished entries so that no one claims them."""

        def waiting(ids: list[str]) -> None:
            self.health.tick()
            with contextlib.suppress(RedisUnavailable):
                self.consumer.touch(ids)

        return self.pipeline.collect(flight, HEARTBEAT_S, waiting)

    def pause(self, held: Sequence[Entry], backoff: Backoff, failing: str) -> bool:
        """Wait out a failing output (`failing`: disk or object_store), keeping the held
        entries from being claimed. Returns False when stopping: the entries stay pending
        for the next run.
        """
        delay = backoff.next_delay()
        what = FAILING[failing]
        log.warning("%s failing; pausing %.1fs with %d entries in hand", what, delay, len(held))
        self.health.paused = what
        deadline = time.monotonic() + delay
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.health.tick()
                with contextlib.suppress(RedisUnavailable):
                    self.consumer.touch([e.id for e in held])
                if self.stop.wait(min(left, HEARTBEAT_S)):
                    return False
        finally:
            self.health.paused = None
        return True

    def _short_wait(self, wanted: int, got: int) -> None:
        self.metrics.short_waits.inc()
        log.warning(
            "WAIT: %d of %d replicas confirmed within %d ms",
            got,
            wanted,
            self.settings.redis_wait_timeout_ms,
        )
