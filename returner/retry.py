"""Waiting out a failing world: jittered backoff, and Redis calls retried until Redis
answers again."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import TypeVar

from returner.errors import RedisUnavailable
from returner.metrics import Health, Metrics

# Logged under the worker's name, as operators know these lines.
log = logging.getLogger("returner.worker")
T = TypeVar("T")

BACKOFF_MIN_S = 0.1
# Redis is retried at least every 2 s, so a failover (seconds) costs little more than
# itself; a failing output is retried less eagerly.
REDIS_BACKOFF_MAX_S, OUTPUT_BACKOFF_MAX_S = 2.0, 10.0


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
    """Raised out of a retry loop when the worker is asked to stop."""


class RedisCalls:
    """Runs Redis actions, retrying each with backoff until it works.

    `outages` counts the times Redis failed and answered again: a worker compares it
    with the count it last caught up with, to take up entries whose read reply was lost.
    """

    def __init__(self, stop: threading.Event, metrics: Metrics, health: Health) -> None:
        self.stop, self.metrics, self.health = stop, metrics, health
        self.outages = 0

    def __call__(self, action: Callable[[], T]) -> T:
        """The action's result, once Redis answered. Raises Stopping when asked to stop
        before that."""
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
                self.outages += 1
                self.metrics.reconnects.inc()
                log.info("redis answers again")
            self.health.tick(redis_ok=True)
            return result
