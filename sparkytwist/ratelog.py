# -*- test-case-name: tests.test_backoff -*-
"""A log line at most once per interval, carrying how many events it stands for.

A broken accounting stream can produce a bad line per record, and a flood of hits
a dropped event per request: logging each would flood the log (and the disk) at
tens of thousands of lines a second. Dropping must never be silent either.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class RateLimitedLog:
    """``warn`` logs at most one line per ``interval`` seconds, with ``{count}``:
    the events since the last line (this one included). Events in between are only
    counted; the next line after the quiet period reports them."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0) -> None:
        self._log = log
        self._clock = clock
        self.interval = interval
        self._last: float | None = None
        self._count = 0

    def warn(self, format: str, *, events: int = 1, **kwargs: Any) -> bool:
        """Count ``events``; log if the interval has passed. True if a line was logged."""
        self._count += events
        now = self._clock.seconds()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._log.warn(format, count=self._count, **kwargs)
        self._last = now
        self._count = 0
        return True
