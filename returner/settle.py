"""Settling, the step between processing and the loop: commit the outcomes (records and
JPEGs durable), release their segments, then ack or dead-letter them in Redis, each with
its event, and report what was settled.

A batch whose commit failed (the output is failing) comes back to the caller to be
tried again after a pause; entries left pending for another delivery stay pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from returner.commit import Committer
from returner.errors import DiskError
from returner.metrics import Health, Metrics
from returner.retry import RedisCalls
from returner.stream import Consumer
from returner.task import Decision, Kind, Outcome, brief

# Task lines keep the logger name operators filter on (the "logger" of LOG_FORMAT=json).
log = logging.getLogger("returner.worker")


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


class Settler:
    """Settles batches of outcomes for one consumer."""

    def __init__(
        self,
        committer: Committer,
        consumer: Consumer,
        release: Callable[[list[str]], list[bool]],
        redis: RedisCalls,
        metrics: Metrics,
        health: Health,
    ) -> None:
        self.committer, self.consumer, self.release = committer, consumer, release
        self.redis, self.metrics, self.health = redis, metrics, health
        self.tally = Tally()

    def settle(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Commit, release segments, then ack or dead-letter; the outcomes to try again
        once the output works (PAUSE). Raises Stopping when asked to stop while Redis is
        down (the entries stay pending)."""
        started = time.perf_counter()
        try:
            committed = self.committer.commit(outcomes)
        except DiskError as exc:
            self.metrics.errors.labels(kind="disk").inc()
            log.error("cannot commit results: %s", exc)
            for outcome in outcomes:
                outcome.pause(exc)
            return outcomes
        done = time.perf_counter()
        self.metrics.stage.labels(stage="commit").observe(done - started)
        settling = [d for d in committed if d.kind.settles]
        released = self._release(settling)
        emitted = self.redis(lambda: self.consumer.settle(committed))
        self.metrics.events.inc(emitted)
        for decision in settling:
            self._report(decision, decision.outcome.entry.id in released)
        for decision in committed:
            if decision.kind is Kind.RETRY:
                self._left_pending(decision.outcome)
        self.metrics.stage.labels(stage="ack").observe(time.perf_counter() - done)
        self.health.progressed()
        paused = [d.outcome for d in committed if d.kind is Kind.PAUSE]
        for outcome in paused:
            self.metrics.errors.labels(kind=outcome.failing).inc()
            if outcome.failure:
                self.metrics.upload_errors.labels(kind=outcome.failure).inc()
        return paused

    def _release(self, settling: list[Decision]) -> set[str]:
        """Unlink the segments of settled outcomes; the IDs of entries whose segment went."""
        outcomes = [d.outcome for d in settling if d.outcome.shm_name]
        freed = self.release([o.shm_name for o in outcomes if o.shm_name])
        return {o.entry.id for o, ok in zip(outcomes, freed, strict=True) if ok}

    def _left_pending(self, outcome: Outcome) -> None:
        self.metrics.errors.labels(kind="task").inc()
        log.warning(
            "task %s/%s left pending: %s",
            brief(outcome.request_id),
            brief(outcome.image_id),
            outcome.error,
        )

    def _report(self, decision: Decision, released: bool) -> None:
        outcome, kind = decision.outcome, decision.kind
        entry = outcome.entry
        latency = max(0.0, time.time() - entry.millis / 1000)
        self.tally.add(kind)
        self.metrics.settled(decision, latency)
        where = f" -> {decision.file_path.name}" if decision.file_path else ""
        why = f": {outcome.error}" if outcome.error else ""
        freed = ", segment released" if released else ""
        fields = {
            "request_id": brief(outcome.request_id),
            "image_id": brief(outcome.image_id),
            "entry_id": entry.id,
            "outcome": kind.value,
            "deliveries": entry.deliveries,
            "duration_s": round(latency, 6),
            **{f"{k}_s": round(v, 6) for k, v in outcome.timings.items()},
        }
        log.log(
            logging.INFO if kind.status == "completed" else logging.WARNING,
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
