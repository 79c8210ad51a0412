# -*- test-case-name: tests.test_backoff -*-
"""Exponential delays between retries, shared by every part that retries Redis or HTTP."""

from __future__ import annotations

import random


class Backoff:
    """``first``, twice that, four times … at most ``maximum`` seconds.

    With an ``rng``, each delay gets "equal jitter" (half fixed, half random), so a
    fleet of processes does not retry in lockstep after an outage; the random
    source is passed in so tests can seed it.
    """

    def __init__(self, first: float, maximum: float, *,
                 rng: random.Random | None = None) -> None:
        self.first = first
        self.maximum = maximum
        self._rng = rng

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before attempt ``attempt + 1``; ``retry_after`` (a server's ask) is a floor."""
        ceiling = float(min(self.maximum, self.first * 2.0 ** min(attempt, 30)))
        if self._rng is not None:
            ceiling = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        return max(ceiling, retry_after) if retry_after is not None else ceiling
