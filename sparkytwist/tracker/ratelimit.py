# -*- test-case-name: tests.test_tracker_parts -*-
"""Per-client token buckets, and log lines that cannot flood the log.

A flood of hits from one address must not fill the events stream (and the
customer's Signals account) with junk, yet the person behind that address still
gets the pixel or the redirect: the limiter only decides what is *recorded*.
Memory stays bounded: at most ``max_clients`` buckets are kept, the least
recently seen one is forgotten first (a forgotten client starts with a full
bucket again, which errs on the side of counting).
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

#: Buckets kept at most; each is ~200 bytes, so the default stays near 20 MB.
DEFAULT_MAX_CLIENTS = 100_000


class PerClientLimiter:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: IReactorTime,
                 max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self.max_clients = max_clients
        # key -> [tokens, last refill time]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        """Take one token for ``key``; False when its bucket is empty."""
        if self.rate <= 0:
            return True
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        self._buckets.move_to_end(key)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True
