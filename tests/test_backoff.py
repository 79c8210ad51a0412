"""Retry delays and rate-limited log lines, shared by every part."""

from __future__ import annotations

import random

from twisted.internet import task
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.backoff import Backoff
from sparkytwist.ratelog import RateLimitedLog


class BackoffTests(SynchronousTestCase):
    def test_doubles_up_to_the_maximum(self) -> None:
        b = Backoff(0.25, 5.0)
        self.assertEqual([b.delay(i) for i in range(7)], [0.25, 0.5, 1, 2, 4, 5, 5])
        self.assertEqual(b.delay(10_000), 5.0)  # no overflow

    def test_jitter_stays_in_the_upper_half(self) -> None:
        b = Backoff(1.0, 300.0, rng=random.Random(3))
        for attempt, ceiling in [(0, 1), (1, 2), (3, 8), (8, 256), (9, 300), (40, 300)]:
            for _ in range(20):
                d = b.delay(attempt)
                self.assertTrue(ceiling / 2 <= d <= ceiling, (attempt, d))

    def test_retry_after_is_a_floor(self) -> None:
        b = Backoff(1.0, 300.0, rng=random.Random(3))
        self.assertEqual(b.delay(0, retry_after=120), 120)
        self.assertGreaterEqual(b.delay(9, retry_after=1), 150)

    def test_seeded_is_repeatable(self) -> None:
        a = Backoff(1.0, 300.0, rng=random.Random(5))
        b = Backoff(1.0, 300.0, rng=random.Random(5))
        self.assertEqual([a.delay(i) for i in range(6)], [b.delay(i) for i in range(6)])


class RateLimitedLogTests(SynchronousTestCase):
    def test_one_line_per_interval_with_the_count(self) -> None:
        clock = task.Clock()
        seen: list[dict[str, object]] = []
        log = RateLimitedLog(Logger(observer=seen.append), clock, interval=10)
        for _ in range(5):
            log.warn("dropped {count}")
        clock.advance(11)
        log.warn("dropped {count}", events=3)
        self.assertEqual([e["count"] for e in seen], [1, 7])
