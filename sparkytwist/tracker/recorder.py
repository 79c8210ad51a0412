# -*- test-case-name: tests.test_tracker_recorder -*-
"""Hits onto the events stream: batched, buffered while Redis is away, never silently lost.

One Redis command per hit would cap the tracker near txredisapi's ~43k commands a
second and spend more CPU on the client than on the HTTP request, so hits wait a
few milliseconds (``batch_delay``) and go out as ONE Lua script call per batch
(up to ``batch_size`` entries, one XADD ... MAXLEN ~ each). Each entry travels as a
single argument (fields joined by NUL bytes, split again in Lua): the client's
cost then grows with the batch, not with the number of fields.

While Redis does not answer, entries stay in a bounded in-memory buffer and the
write is retried with backoff; what does not fit is counted and logged (rate
limited). A batch whose reply never came is written again, so an outage can
duplicate a few entries but does not lose any that fit in the buffer: the
stream is at-least-once, like the feeder's delivery.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from sparkytwist.backoff import Backoff
from sparkytwist.metrics import Metrics
from sparkytwist.ratelog import RateLimitedLog
from sparkytwist.redis import Redis, Script
from sparkytwist.store import Keys
from sparkytwist.trackevent import TrackEvent

_log = Logger()

#: KEYS[1] the stream, ARGV[1] the MAXLEN ~ cap, ARGV[2..] one entry each:
#: field NUL value NUL field NUL value ...
_XADD_BATCH = Script("""
local key, cap = KEYS[1], ARGV[1]
for i = 2, #ARGV do
  local entry, fields, start = ARGV[i], {}, 1
  while true do
    local nul = string.find(entry, '\\0', start, true)
    if not nul then
      fields[#fields + 1] = string.sub(entry, start)
      break
    end
    fields[#fields + 1] = string.sub(entry, start, nul - 1)
    start = nul + 1
  end
  redis.call('XADD', key, 'MAXLEN', '~', cap, '*', unpack(fields))
end
return #ARGV - 1
""")

DEFAULT_BATCH_SIZE = 1000
DEFAULT_BATCH_DELAY = 0.002
RETRY_FIRST = 0.05
RETRY_MAX = 5.0


def encode_entry(event: TrackEvent) -> bytes:
    """The entry as one NUL-separated argument (NUL bytes inside values are removed)."""
    parts: list[bytes] = []
    for name, value in event.to_fields().items():
        parts.append(name)
        parts.append(value.replace(b"\x00", b"") if b"\x00" in value else value)
    return b"\x00".join(parts)


class EventRecorder(Service):
    """Collects hits and writes them to the events stream in batches.

    ``record`` never waits and never touches Redis itself: the write happens
    at least ``batch_delay`` later, after the response has been written.
    """

    name = "tracker-recorder"

    def __init__(self, redis: Redis, keys: Keys, *, maxlen: int, capacity: int,
                 clock: Any, metrics: Metrics, batch_size: int = DEFAULT_BATCH_SIZE,
                 batch_delay: float = DEFAULT_BATCH_DELAY) -> None:
        self._redis = redis
        self._key = keys.events
        self._maxlen = str(maxlen).encode()
        self._clock = clock
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        #: At least one batch fits, so tracker_buffer = 0 still records while Redis is up.
        self.capacity = max(capacity, batch_size)
        self._pending: deque[bytes] = deque()
        self._writing: list[bytes] = []
        self._timer: IDelayedCall | None = None
        self._failures = 0
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._overflow_log = RateLimitedLog(_log, clock)
        self._failure_log = RateLimitedLog(_log, clock)
        self._backoff = Backoff(RETRY_FIRST, RETRY_MAX)

        self._recorded = metrics.counter(
            "tracker_events_recorded", "Tracking events written to the Redis events stream")
        self._dropped = metrics.counter(
            "tracker_events_dropped", "Tracking hits not recorded, by reason "
            "(overflow, rate_limit, bot_policy, shutdown)", ["reason"])
        self._dropped_overflow = self._dropped.labels("overflow")
        for reason in ("rate_limit", "bot_policy", "shutdown"):
            self._dropped.labels(reason)  # at 0 from the start: see metrics.py
        self._batches = metrics.counter(
            "tracker_redis_batches", "Batches of events written to Redis")
        self._batch_failures = metrics.counter(
            "tracker_redis_failures", "Batch writes to Redis that failed (retried)")
        buffered = metrics.gauge(
            "tracker_events_buffered", "Tracking events waiting in memory for Redis")
        buffered.set_function(lambda: float(self.pending))

    @property
    def pending(self) -> int:
        """Entries not yet confirmed written (waiting plus the batch being written)."""
        return len(self._pending) + len(self._writing)

    def dropped(self, reason: str, count: int = 1) -> None:
        """Count a hit that is not recorded (rate limit, bot policy)."""
        self._dropped.labels(reason).inc(count)

    def record(self, event: TrackEvent) -> bool:
        """Queue one entry; False (counted, logged at a bounded pace) when the buffer is full."""
        if len(self._pending) + len(self._writing) >= self.capacity:
            self._dropped_overflow.inc()
            self._overflow_log.warn(
                "tracker: event buffer full ({capacity} entries, Redis not keeping up or "
                "unreachable): {count} event(s) dropped", capacity=self.capacity)
            return False
        self._pending.append(encode_entry(event))
        if self._timer is None and not self._writing:
            self._timer = self._clock.callLater(self.batch_delay, self._flush)
        return True

    def _flush(self) -> None:
        self._timer = None
        if self._writing or not self._pending:
            return
        n = min(self.batch_size, len(self._pending))
        pending = self._pending
        batch = [pending.popleft() for _ in range(n)]
        self._writing = batch
        d = defer.Deferred.fromCoroutine(
            _XADD_BATCH(self._redis, [self._key], [self._maxlen, *batch]))
        d.addCallbacks(self._written, self._failed)

    def _written(self, _: object) -> None:
        self._batches.inc()
        self._recorded.inc(len(self._writing))
        self._writing = []
        if self._failures:
            _log.info("tracker: Redis writes resumed; {pending} event(s) still buffered",
                      pending=len(self._pending))
        self._failures = 0
        self._next()

    def _failed(self, failure: Any) -> None:
        self._batch_failures.inc()
        self._pending.extendleft(reversed(self._writing))
        self._writing = []
        delay = self._backoff.delay(self._failures)
        self._failures += 1
        self._failure_log.warn(
            "tracker: cannot write events to Redis ({error}); {pending} buffered, "
            "retrying ({count} failure(s) since the last message)",
            error=failure.getErrorMessage(), pending=len(self._pending))
        if self.running and self._timer is None:
            self._timer = self._clock.callLater(delay, self._flush)
        self._notify_idle()

    def _next(self) -> None:
        if self._pending and self._timer is None and self.running:
            self._timer = self._clock.callLater(0, self._flush)
        self._notify_idle()

    def _notify_idle(self) -> None:
        if self._writing:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _wait_idle(self) -> defer.Deferred[None]:
        if not self._writing:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        """Write what is buffered while Redis answers; count the rest as lost."""
        self._cancel_timer()
        await self._wait_idle()
        while self._pending:
            self._flush()
            await self._wait_idle()
            if self._failures:
                break
        self._cancel_timer()
        if self._pending:
            lost = len(self._pending)
            self._pending.clear()
            self.dropped("shutdown", lost)
            _log.error("tracker: stopped with Redis unreachable: {lost} event(s) lost",
                       lost=lost)
