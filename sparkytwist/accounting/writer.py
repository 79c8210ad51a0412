# -*- test-case-name: tests.test_accounting_writer -*-
"""Delivery facts into Redis: one Lua script call per batch, a few batches in flight.

One command per record cannot keep up (txredisapi tops out near 43k single
commands/s), so records are gathered into batches (``batch_size`` records or
``max_delay`` seconds, whichever comes first) and each batch is ONE ``EVALSHA``:
the script does HSET + EXPIRE for every key. The values travel positionally in one
NUL-separated argument (seven per record, "" for an empty one): no field name is
sent per record, and the client encodes one argument per batch instead of eight per
record (txredisapi's per-argument encoding was most of the cost).

The writer never drops what it was given. A failed batch (Redis down, a timeout)
goes back to the front of the queue and is retried with backoff, one batch at a
time, until Redis answers; meanwhile, and whenever too many records wait, it asks
its input to pause (``set_flow``), which is the backpressure to PowerMTA. HSET is
idempotent, so a batch that was written but whose answer was lost does no harm
when it is written again.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkytwist.accounting.stats import Stats
from sparkytwist.acctcsv import DeliveryFacts
from sparkytwist.backoff import Backoff
from sparkytwist.redis import Redis, RedisUnavailable, Script
from sparkytwist.store import Keys

_log = Logger()

#: Hash fields, in the order the script receives their values.
FIELDS = (
    "campaign_id",
    "subaccount_id",
    "friendly_from",
    "sending_ip",
    "ip_pool",
    "routing_domain",
    "delivered_at",
)

#: Separates (and ends) the values in the batch's data argument.
SEP = "\0"

#: KEYS = one hash per record; ARGV[1] = the TTL in seconds, ARGV[2] = the values of
#: every record, in FIELDS order, each ended by a NUL: one argument for the whole
#: batch, because building each argument costs the client far more than Redis
#: spends splitting them. Empty values are not stored. A key holding another type
#: (WRONGTYPE) is counted and skipped, not retried forever; any other error fails
#: the batch, which is then retried (what was written before is written again).
WRITE_SCRIPT = Script(
    "local F = {" + ", ".join(f"'{name}'" for name in FIELDS) + "}\n"
    + """
local nf = #F
local ttl = ARGV[1]
local data = ARGV[2]
local pos = 1
local refused = 0
for i = 1, #KEYS do
  local args = {}
  local k = 0
  for f = 1, nf do
    local e = string.find(data, '\\0', pos, true)
    if e > pos then
      args[k + 1] = F[f]
      args[k + 2] = string.sub(data, pos, e - 1)
      k = k + 2
    end
    pos = e + 1
  end
  if k > 0 then
    local r = redis.pcall('HSET', KEYS[i], unpack(args))
    if type(r) == 'table' and r.err then
      if string.find(r.err, 'WRONGTYPE', 1, true) then
        refused = refused + 1
      else
        return redis.error_reply(r.err)
      end
    else
      redis.call('EXPIRE', KEYS[i], ttl)
    end
  end
end
return refused
"""
)


@dataclass(slots=True)
class _Batch:
    keys: list[bytes]
    values: list[str]  #: one NUL-terminated row of values per key

    @property
    def count(self) -> int:
        return len(self.keys)


def _clean_row(f: DeliveryFacts) -> str:
    values = (f.campaign_id, "" if f.subaccount_id is None else str(f.subaccount_id),
              f.friendly_from, f.sending_ip, f.ip_pool, f.routing_domain,
              "" if f.delivered_at is None else str(f.delivered_at))
    return "".join(v.replace(SEP, "") + SEP for v in values)


class DeliveryWriter:
    """Batches delivery facts into Redis and tells its input when to pause."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        ttl: float,
        clock: IReactorTime,
        stats: Stats,
        batch_size: int = 1000,
        max_delay: float = 0.005,
        max_in_flight: int = 4,
        high_water: int | None = None,
        backoff: Backoff | None = None,
        script: Script = WRITE_SCRIPT,
    ) -> None:
        self._redis = redis
        self._key = keys.delivery
        self._ttl = str(max(1, math.ceil(ttl)))
        self._clock = clock
        self._stats = stats
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.max_in_flight = max_in_flight
        #: Pause the input above this many unwritten records, resume at half of it.
        self.high_water = high_water if high_water is not None else 20 * batch_size
        self._backoff = backoff or Backoff(0.25, 5.0)
        self._script = script
        self._keys: list[bytes] = []
        self._values: list[str] = []
        self._queue: deque[_Batch] = deque()
        self._in_flight = 0
        self._timer: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._attempt = 0
        self._down = False
        self._stopped = False
        self._drain_waiters: list[defer.Deferred[None]] = []
        self._pause: Callable[[], None] | None = None
        self._resume: Callable[[], None] | None = None
        self._paused_since: float | None = None
        #: Records given to :meth:`write` and not yet confirmed written.
        self.pending = 0

    # -- input side ---------------------------------------------------------------

    def set_flow(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """Who to tell to stop and restart reading."""
        self._pause = pause
        self._resume = resume

    @property
    def paused(self) -> bool:
        """Is the input asked to pause right now?"""
        return self._paused_since is not None

    @property
    def redis_down(self) -> bool:
        return self._down

    def write(self, facts: Sequence[DeliveryFacts]) -> None:
        """Queue these facts; they are sent in batches."""
        key = self._key
        keys = self._keys
        values = self._values
        size = self.batch_size
        self.pending += len(facts)
        for f in facts:
            keys.append(key(f.message_id, f.rcpt))
            sub = f.subaccount_id
            when = f.delivered_at
            row = (f"{f.campaign_id}\0{'' if sub is None else sub}\0{f.friendly_from}\0"
                   f"{f.sending_ip}\0{f.ip_pool}\0{f.routing_domain}\0"
                   f"{'' if when is None else when}\0")
            if row.count(SEP) != len(FIELDS):  # a NUL inside a value: drop those NULs
                row = _clean_row(f)
            values.append(row)
            if len(keys) >= size:
                self._close_batch()
                keys = self._keys
                values = self._values
        if self._keys and self._timer is None and not self._stopped:
            self._timer = self._clock.callLater(self.max_delay, self._timer_fired)
        self._update_flow()

    def flush(self) -> None:
        """Send what is gathered now instead of waiting for ``max_delay``."""
        if self._keys:
            self._close_batch()

    def drain(self) -> defer.Deferred[None]:
        """Flush; fires once every record given so far is written."""
        self.flush()
        if self.pending == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(d)
        return d

    def stop(self) -> int:
        """Give up: no more retries or sends. Returns the records never written."""
        self._stopped = True
        for call in (self._timer, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._retry = None
        if self._paused_since is not None:  # account for the pause; don't resume input
            self._stats.pause_changed(False, self._clock.seconds() - self._paused_since)
            self._paused_since = None
        return self.pending

    # -- batches ------------------------------------------------------------------

    def _timer_fired(self) -> None:
        self._timer = None
        self.flush()

    def _close_batch(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self._queue.append(_Batch(self._keys, self._values))
        self._keys = []
        self._values = []
        self._pump()

    def _pump(self) -> None:
        while (
            self._queue
            and self._retry is None
            and not self._stopped
            and self._in_flight < (1 if self._down else self.max_in_flight)
        ):
            batch = self._queue.popleft()
            self._in_flight += 1
            d = defer.Deferred.fromCoroutine(
                self._script(self._redis, list(batch.keys), [self._ttl, "".join(batch.values)]))
            d.addCallbacks(self._written, self._failed, callbackArgs=(batch,),
                           errbackArgs=(batch,))

    def _written(self, refused: Any, batch: _Batch) -> None:
        self._in_flight -= 1
        n_refused = int(refused or 0)
        self._stats.batch_written(batch.count - n_refused, n_refused)
        if n_refused:
            _log.warn("accounting: Redis refused {n} delivery keys (they hold another type)",
                      n=n_refused)
        self.pending -= batch.count
        if self._down:
            self._down = False
            self._attempt = 0
            _log.info("accounting: Redis writes work again; {pending} records waiting",
                      pending=self.pending)
        self._pump()
        self._update_flow()
        if self.pending == 0 and not self._keys and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def _failed(self, failure: Failure, batch: _Batch) -> None:
        self._in_flight -= 1
        self._queue.appendleft(batch)
        self._stats.write_failed()
        if self._stopped:
            return
        if not self._down:
            self._down = True
            why = ("Redis is unavailable" if failure.check(RedisUnavailable)
                   else "Redis refused the batch")
            _log.warn("accounting: {why} ({error}); reading paused, {pending} records "
                      "kept and retried", why=why, error=str(failure.value),
                      pending=self.pending)
        if self._retry is None:
            delay = self._backoff.delay(self._attempt)
            self._attempt += 1
            self._retry = self._clock.callLater(delay, self._retry_now)
        self._update_flow()

    def _retry_now(self) -> None:
        self._retry = None
        self._pump()

    # -- flow control -------------------------------------------------------------

    def _update_flow(self) -> None:
        self._stats.pending(self.pending)
        if self._stopped:
            return
        if self._down or self.pending >= self.high_water:
            self._set_paused(True)
        elif self.pending <= self.high_water // 2:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        now = self._clock.seconds()
        if paused:
            self._paused_since = now
            self._stats.pause_changed(True)
            if self._pause is not None:
                self._pause()
        else:
            assert self._paused_since is not None
            waited = now - self._paused_since
            self._paused_since = None
            self._stats.pause_changed(False, waited)
            if self._resume is not None:
                self._resume()
