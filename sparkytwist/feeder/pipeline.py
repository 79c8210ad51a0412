# -*- test-case-name: tests.test_feeder -*-
"""The feeder's loop: a LoopingCall that turns stream entries into delivered batches.

Each tick runs one *cycle* (unless the previous one is still running): read what
is there — first our own pending entries (a restart), then entries idle for
``claim_idle`` in any consumer (a dead feeder's batch), then new ones — and flush
a batch when it is full or old enough. A flushed batch is enriched (lookups sent
at once, a thousand keys each) and its lines built, then handed to the *sender*,
which gzips it and retries it until the sink takes it or refuses it for good;
meanwhile the cycle reads and builds the next batch, then waits for the sender.
So at most two batches are in memory, each is acknowledged only after its own
answer, and a slow or failing sink stops the reading (the stream, capped, absorbs
the rest).

Nothing is acknowledged before the sink accepted it (or it went to the dead-letter
stream, or it is too old for Ingest); entries we hold are kept fresh with XCLAIM
so other feeders do not take them while we are still working on them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkytwist.backoff import Backoff
from sparkytwist.events import (
    INGEST_MAX_AGE_SECONDS,
    INGEST_MAX_BYTES,
    GeoLookup,
    LineEncoder,
    UserAgentParser,
    encode_batch,
    encode_enrichment,
    enrichment_from_hash,
)
from sparkytwist.feeder.batch import BatchBuilder, Item, pack
from sparkytwist.feeder.consumer import Entry, StreamConsumer
from sparkytwist.feeder.sinks import (
    Delivered,
    EncodedBatch,
    Outcome,
    Rejected,
    Sink,
)
from sparkytwist.feeder.stats import FeederStats
from sparkytwist.metrics import Metrics
from sparkytwist.redis import RedisUnavailable
from sparkytwist.trackevent import MalformedEntry, TrackEvent

_log = Logger()

#: How often the LoopingCall looks at the stream (no XREADGROUP BLOCK: the Redis
#: connection is shared with the other parts and must never be held).
POLL_INTERVAL = 0.5
#: Entries per XREADGROUP / XAUTOCLAIM.
READ_COUNT = 1000
#: Events this close to Ingest's 24 h limit are dropped too: they would be stale on
#: arrival (a request takes time, and clocks differ a little).
AGE_MARGIN = 60.0
#: Backoff between attempts: 1 s, 2 s, 4 s, ... up to 5 min, each with jitter.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
#: After the key was refused (401/403): wait this long before trying again.
AUTH_PAUSE = 3600.0
#: On stop, how long an upload already on the wire may take to finish.
STOP_GRACE = 10.0
#: Dead letters kept (each holds a gzip batch of at most ~1 MB, typically ~0.4 MB).
DEAD_LETTER_MAXLEN = 100
#: How often the lag gauges are refreshed.
LAG_INTERVAL = 15.0
#: The delivery facts (accounting hash fields) a SparkPost event carries.
ENRICHMENT_FIELDS = ("campaign_id", "subaccount_id", "friendly_from", "sending_ip",
                     "ip_pool", "routing_domain")
#: Build lines in slices this big, letting the reactor serve others in between.
BUILD_SLICE = 1000
#: Bodies above this are gzipped in a thread (zlib releases the GIL).
THREAD_ENCODE_MIN = 256 * 1024


@dataclass
class Prepared:
    """A batch ready to go: its items (ids, lines, timestamps) and its body."""

    items: list[Item]
    body: bytes
    raw_bytes: int

    def encoded(self) -> EncodedBatch:
        return EncodedBatch(self.body, self.raw_bytes, len(self.items),
                            self.items[0].entry_id, self.items[-1].entry_id)

    @property
    def ids(self) -> list[bytes]:
        return [item.entry_id for item in self.items]

    @property
    def oldest_ms(self) -> int:
        return min(item.event.timestamp_ms for item in self.items)


class Feeder:
    """The moving parts; :class:`FeederService` starts and stops it."""

    def __init__(
        self,
        *,
        consumer: StreamConsumer,
        sink: Sink,
        metrics: Metrics,
        reactor: Any,
        clock: Any = None,
        max_bytes: int = INGEST_MAX_BYTES,
        max_age: float = 30.0,
        claim_idle: float = 300.0,
        ua: UserAgentParser | None = None,
        geo: GeoLookup | None = None,
        rng: random.Random | None = None,
        poll_interval: float = POLL_INTERVAL,
        read_count: int = READ_COUNT,
        auth_pause: float = AUTH_PAUSE,
        stop_grace: float = STOP_GRACE,
        dead_letter_maxlen: int = DEAD_LETTER_MAXLEN,
    ) -> None:
        self.consumer = consumer
        self.sink = sink
        self._reactor = reactor  # threads, and yielding while building lines
        self.clock = clock if clock is not None else reactor  # every wait we decide
        self.builder = BatchBuilder(min(max_bytes, INGEST_MAX_BYTES), max_age)
        self.claim_idle = claim_idle
        self._lines = LineEncoder(ua if ua is not None else UserAgentParser())
        self._geo = geo
        self.backoff = Backoff(
            BACKOFF_BASE, BACKOFF_CAP, rng=rng if rng is not None else random.Random())  # noqa: S311 - jitter, not secrets
        self.poll_interval = poll_interval
        self.read_count = read_count
        self.auth_pause = auth_pause
        self.stop_grace = stop_grace
        self.dead_letter_maxlen = dead_letter_maxlen
        self.metrics = FeederStats(metrics, sink.name)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._reset()

    def _reset(self) -> None:
        self._stopping = False
        self._group_ready = False
        self._own_cursor: bytes | None = b"0"  # re-send our own pending entries first
        self._claim_cursor: bytes | None = None
        self._next_claim = 0.0
        self._next_touch = 0.0
        self._next_lag = 0.0
        self._held: set[bytes] = set()
        self._auth_refused = False
        self._redis_down = False
        self._cycle: defer.Deferred[None] | None = None
        self._sending: defer.Deferred[None] | None = None
        self._ahead: defer.Deferred[list[Entry]] | None = None
        self._attempt: defer.Deferred[Outcome] | None = None
        self._sleep: defer.Deferred[None] | None = None
        self._side: list[defer.Deferred[None]] = []

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._reset()
        self.builder.take()
        _log.info("feeder: consumer {name} of group {group} on {stream} -> {sink}",
                  name=self.consumer.name, group=self.consumer.group.decode(),
                  stream=self.consumer.stream.decode(), sink=self.sink.name)
        self._loop.start(self.poll_interval, now=True)

    def stop(self) -> defer.Deferred[None]:
        """Finish the upload on the wire (up to ``stop_grace``), abandon the rest.

        Abandoned entries stay pending in the group: the next start re-sends them
        (same consumer name) or another feeder claims them after ``claim_idle``.
        """
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        if self._sleep is not None:
            self._sleep.cancel()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        attempt = self._attempt
        if attempt is not None:
            if self.stop_grace <= 0:
                attempt.cancel()
            else:
                timer = self._reactor.callLater(self.stop_grace, attempt.cancel)
                attempt.addBoth(_cancel_timer, timer)
        for d in (self._sending, self._cycle, *self._side):
            if d is not None:
                await _quietly(d)
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # read but not accepted: stays pending for the next start
            ahead.addErrback(lambda _: [])
            await ahead
        if self._held:
            _log.info("feeder: stopped with {n} events left pending for the next start",
                      n=len(self._held))
        self._held.clear()
        self.builder.take()

    # --- the loop ---------------------------------------------------------------

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self._held and now >= self._next_touch:
            self._next_touch = now + max(self.claim_idle / 3, self.poll_interval)
            self._side_task(self._touch())
        if now >= self._next_lag:
            self._next_lag = now + LAG_INTERVAL
            self._side_task(self.update_lag())
        if self._cycle is None:
            self._cycle = defer.Deferred.fromCoroutine(self._run_cycle())
            self._cycle.addErrback(lambda f: _log.failure("feeder: cycle failed", f))
            self._cycle.addBoth(self._cycle_done)

    def _cycle_done(self, _: object) -> None:
        self._cycle = None

    def _side_task(self, coro: Any) -> None:
        d: defer.Deferred[None] = defer.Deferred.fromCoroutine(coro)
        self._side.append(d)

        def done(result: object) -> None:
            self._side.remove(d)
            if isinstance(result, Failure) and not result.check(RedisUnavailable):
                _log.failure("feeder: background task failed", result)

        d.addBoth(done)

    async def settle(self) -> None:
        """Wait until no cycle runs and no batch is on its way (tests, benchmark).

        A sender waiting out a backoff on the clock counts as "on its way".
        """
        while self._cycle is not None or self._sending is not None:
            pending = self._cycle if self._cycle is not None else self._sending
            assert pending is not None
            await _quietly(pending)

    async def pump(self) -> None:
        """Run a cycle now (after the current one, if any) and wait for it; for tests."""
        if self._cycle is not None:
            await _quietly(self._cycle)
        self._cycle = defer.Deferred.fromCoroutine(self._run_cycle())
        self._cycle.addBoth(self._cycle_done)
        await self._cycle

    async def _run_cycle(self) -> None:
        try:
            if not self._group_ready:
                if await self.consumer.ensure_group():
                    _log.info("feeder: created consumer group {group}",
                              group=self.consumer.group.decode())
                self._group_ready = True
            while not self._stopping:
                got = 0 if self.builder.full else await self._fill()
                # An old batch still takes what is there at once (up to full) before
                # it goes: one full request rather than a trail of small ones.
                if self.builder.full or (not got and self.builder.due(self.clock.seconds())):
                    await self._flush()
                elif not got:
                    break
            self._redis_up()
        except RedisUnavailable as e:
            if not self._redis_down:
                _log.warn("feeder: Redis unavailable, will retry: {error}", error=e)
            self._redis_down = True

    def _redis_up(self) -> None:
        if self._redis_down:
            _log.info("feeder: Redis is back")
        self._redis_down = False

    async def _fill(self) -> int:
        """One read from the best source; how many entries it brought (0: none)."""
        count = self.read_count
        if self._ahead is not None:
            return await self._accept(await self._read_new(count))
        if self._own_cursor is not None:
            entries = await self.consumer.read_own_pending(self._own_cursor, count)
            entries = [e for e in entries if e[0] not in self._held]
            if entries:
                self._own_cursor = entries[-1][0]
                _log.info("feeder: re-sending {n} entries left pending by a previous run",
                          n=len(entries))
                return await self._accept(entries)
            self._own_cursor = None
        now = self.clock.seconds()
        if self._claim_cursor is not None or now >= self._next_claim:
            cursor, entries = await self.consumer.autoclaim(
                self.claim_idle, self._claim_cursor or b"0-0", count)
            if cursor == b"0-0":
                self._claim_cursor = None
                self._next_claim = now + max(self.claim_idle / 2, self.poll_interval)
            else:
                self._claim_cursor = cursor
            entries = [e for e in entries if e[0] not in self._held]
            if entries:
                self.metrics.claimed.inc(len(entries))
                _log.info("feeder: took over {n} entries idle for {idle:g}s or more",
                          n=len(entries), idle=self.claim_idle)
                return await self._accept(entries)
        return await self._accept(await self._read_new(count))

    async def _read_new(self, count: int) -> list[Entry]:
        """New entries; after a full page the next read is sent at once (read-ahead),
        so Redis prepares it while this one is turned into items."""
        ahead, self._ahead = self._ahead, None
        entries = await (ahead if ahead is not None else self.consumer.read_new(count))
        if len(entries) >= count and not self._stopping:
            self._ahead = defer.Deferred.fromCoroutine(self.consumer.read_new(count))
        return entries

    async def _accept(self, entries: Sequence[Entry]) -> int:
        now = self.clock.seconds()
        trimmed: list[bytes] = []
        malformed: list[bytes] = []
        for entry_id, fields in entries:
            if fields is None:
                trimmed.append(entry_id)
                continue
            try:
                event = TrackEvent.from_fields(fields)
            except MalformedEntry as e:
                _log.warn("feeder: dropping entry {id}: {error}", id=entry_id.decode(), error=e)
                malformed.append(entry_id)
                continue
            self._held.add(entry_id)
            self.builder.add(Item(entry_id, event), now)
        if trimmed:
            _log.warn("feeder: {n} pending entries were trimmed from the stream (events_maxlen)"
                      " before they could be sent", n=len(trimmed))
        if trimmed or malformed:
            await self.consumer.ack(trimmed + malformed)
            self.metrics.dropped("trimmed", len(trimmed))
            self.metrics.dropped("malformed", len(malformed))
        return len(entries)

    # --- preparing a batch ------------------------------------------------------

    async def _flush(self) -> None:
        items, started = self.builder.take()
        try:
            items = await self._drop_too_old(items)
            fresh = [item for item in items if item.line is None]
            if fresh:
                await self._build_lines(fresh)
        except BaseException:
            # Redis failed mid-way: the items go back into the batch (the next cycle
            # retries them) instead of staying held, pending and never claimed.
            self.builder.put_back(items, started)
            raise
        batch_items, rest = pack(items, self.builder.max_bytes)
        self.builder.put_back(rest, started)
        if not batch_items:
            return
        if self._sending is not None:
            await _quietly(self._sending)
        if self._stopping:
            return  # left pending
        self._sending = defer.Deferred.fromCoroutine(self._deliver(batch_items))
        self._sending.addErrback(lambda f: _log.failure("feeder: sender failed", f))
        self._sending.addBoth(self._sent)

    def _sent(self, _: object) -> None:
        self._sending = None

    async def _drop_too_old(self, items: list[Item]) -> list[Item]:
        cutoff_ms = (self.clock.seconds() - INGEST_MAX_AGE_SECONDS + AGE_MARGIN) * 1000
        old = [item.entry_id for item in items if item.event.timestamp_ms < cutoff_ms]
        if not old:
            return items
        _log.warn("feeder: dropping {n} events older than 24 h (Ingest refuses them)",
                  n=len(old))
        await self._ack(old)
        self.metrics.dropped("too_old", len(old))
        return [item for item in items if item.event.timestamp_ms >= cutoff_ms]

    async def _build_lines(self, items: list[Item]) -> None:
        keys = self.consumer.keys
        item_keys = [keys.delivery(item.event.message_id, item.event.rcpt) for item in items]
        distinct = list(dict.fromkeys(item_keys))
        # The delivery facts are asked for in slices, all sent at once: Redis looks up
        # the next slice while the lines of the previous one are built. A key's first
        # item never comes before it in ``distinct``, so slice n of the items only
        # needs the facts of slices 0..n.
        lookups = [defer.Deferred.fromCoroutine(self.consumer.delivery_facts(
            distinct[start:start + BUILD_SLICE], ENRICHMENT_FIELDS))
            for start in range(0, len(distinct), BUILD_SLICE)]
        # Recipients of one campaign share their facts: parse and encode each set once.
        encoded: dict[tuple[str | bool, ...], str] = {}
        enrichment: dict[bytes, str] = {}
        line, geo = self._lines.line, self._geo
        try:
            for n, start in enumerate(range(0, len(items), BUILD_SLICE)):
                if start:  # let the reactor serve the others between slices
                    await task.deferLater(self._reactor, 0, lambda: None)
                if n < len(lookups):
                    rows = await lookups[n]
                    self._enrichments(distinct[start:start + BUILD_SLICE], rows, encoded,
                                      enrichment)
                end = start + BUILD_SLICE
                for item, key in zip(items[start:end], item_keys[start:end], strict=True):
                    event = item.event
                    item.line = line(
                        item.entry_id, event,
                        geo=geo.lookup(event.ip) if geo is not None and event.ip else None,
                        enrichment=enrichment[key])
        finally:
            for d in lookups:  # after a failure: no "unhandled error" for the rest
                d.addErrback(lambda _: None)

    @staticmethod
    def _enrichments(keys: list[bytes], rows: list[list[str | bool]],
                     encoded: dict[tuple[str | bool, ...], str],
                     enrichment: dict[bytes, str]) -> None:
        for key, row in zip(keys, rows, strict=True):
            facts = tuple(row)
            part = encoded.get(facts)
            if part is None:
                part = encoded[facts] = encode_enrichment(enrichment_from_hash({
                    name: v for name, v in zip(ENRICHMENT_FIELDS, row, strict=True)
                    if isinstance(v, str) and v}))
            enrichment[key] = part

    async def _encode(self, items: list[Item]) -> Prepared:
        lines = [item.line for item in items if item.line is not None]
        raw = sum(len(line) for line in lines)
        if raw >= THREAD_ENCODE_MIN:
            body: bytes = await threads.deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), encode_batch, lines)
        else:
            body = encode_batch(lines)
        return Prepared(items, body, raw)

    # --- sending ----------------------------------------------------------------

    async def _deliver(self, items: list[Item]) -> None:
        """Gzip the batch, then send it until the sink takes or refuses it; meanwhile
        the cycle reads and builds the next one."""
        attempt = 0
        prepared = Prepared(items, b"", 0)
        try:
            prepared = await self._encode(items)
            while not self._stopping:
                cutoff_ms = (self.clock.seconds() - INGEST_MAX_AGE_SECONDS + AGE_MARGIN) * 1000
                if prepared.oldest_ms < cutoff_ms:  # it waited (retries) past Ingest's limit
                    kept = await self._drop_too_old(prepared.items)
                    if not kept:
                        return
                    prepared = await self._encode(kept)
                batch = prepared.encoded()
                began = self.clock.seconds()
                self._attempt = self.sink.deliver(batch)
                try:
                    outcome = await self._attempt
                finally:
                    self._attempt = None
                if isinstance(outcome, Delivered):
                    await self._delivered(prepared, outcome, self.clock.seconds() - began)
                    return
                if isinstance(outcome, Rejected):
                    if await self._rejected(prepared, outcome):
                        return
                    continue
                delay = self.backoff.delay(attempt, outcome.retry_after)
                attempt += 1
                self.metrics.batch(outcome.status or "error")
                self.metrics.retries.inc()
                _log.warn("feeder: batch of {events} events to {sink} failed ({reason}); "
                          "attempt {attempt}, retrying in {delay:.1f}s",
                          events=batch.events, sink=self.sink.name, reason=outcome.reason,
                          attempt=attempt, delay=delay)
                await self._wait(delay)
        except defer.CancelledError:
            pass  # stopping: the batch stays pending
        finally:
            self._held.difference_update(prepared.ids)

    async def _delivered(self, prepared: Prepared, outcome: Delivered, took: float) -> None:
        batch = prepared.encoded()
        _log.info("feeder: sent {events} events ({raw} bytes, {gzip} gzip) to {sink} in "
                  "{took:.2f}s: {status} {detail}", events=batch.events, raw=batch.raw_bytes,
                  gzip=len(batch.body), sink=self.sink.name, took=took,
                  status=outcome.status, detail=outcome.detail)
        self.metrics.batch(outcome.status)
        self.metrics.sent.inc(batch.events)
        self.metrics.raw_bytes.inc(batch.raw_bytes)
        self.metrics.gzip_bytes.inc(len(batch.body))
        if self._auth_refused:
            _log.info("feeder: {sink} accepts the key again", sink=self.sink.name)
        self._auth_refused = False
        self.metrics.paused.set(0)
        await self._ack(prepared.ids)

    async def _rejected(self, prepared: Prepared, outcome: Rejected) -> bool:
        """Dead-letter the batch (True), or keep it while the key is refused (False)."""
        batch = prepared.encoded()
        self.metrics.batch(outcome.status)
        if outcome.pause and self._auth_refused:
            _log.error("feeder: {sink} still refuses the API key (HTTP {status}); batch "
                       "kept, next try in {pause:g}s", sink=self.sink.name,
                       status=outcome.status, pause=self.auth_pause)
            await self._wait(self.auth_pause)
            return False
        _log.error("feeder: {sink} refused a batch of {events} events (HTTP {status}: "
                   "{body}); it goes to the dead-letter stream {key}", sink=self.sink.name,
                   events=batch.events, status=outcome.status, body=outcome.body[:300],
                   key=self.consumer.keys.dead_letters.decode())
        attempt = 0
        while True:
            try:
                await self.consumer.dead_letter({
                    "reason": f"HTTP {outcome.status}",
                    "status": outcome.status,
                    "response": outcome.body[:2000],
                    "sink": self.sink.name,
                    "events": batch.events,
                    "first_id": batch.first_id,
                    "last_id": batch.last_id,
                    "at": int(self.clock.seconds()),
                    "batch": batch.body,
                }, self.dead_letter_maxlen)
                break
            except RedisUnavailable:
                await self._wait(self.backoff.delay(attempt))
                attempt += 1
        self.metrics.dead_batches.inc()
        self.metrics.dead_events.inc(batch.events)
        await self._ack(prepared.ids)
        if outcome.pause:
            self._auth_refused = True
            self.metrics.paused.set(1)
            _log.error("feeder: {sink} refuses the API key (HTTP {status}): PAUSED for "
                       "{pause:g}s; events wait in the stream. Fix sparkpost_api_key and "
                       "restart to resume at once.", sink=self.sink.name,
                       status=outcome.status, pause=self.auth_pause)
            with contextlib.suppress(defer.CancelledError):
                await self._wait(self.auth_pause)
        return True

    async def _wait(self, seconds: float) -> None:
        self._sleep = task.deferLater(self.clock, seconds, lambda: None)
        try:
            await self._sleep
        finally:
            self._sleep = None

    async def _ack(self, ids: list[bytes]) -> None:
        """XACK, a few tries; if Redis stays away the entries stay pending (resent later)."""
        try:
            for attempt in range(4):
                try:
                    await self.consumer.ack(ids)
                except RedisUnavailable as e:
                    if attempt == 3:
                        _log.warn("feeder: could not acknowledge {n} entries ({error}); "
                                  "they will be sent again", n=len(ids), error=e)
                        return
                    await task.deferLater(self._reactor, 0.5 * 2 ** attempt, lambda: None)
                else:
                    return
        finally:
            self._held.difference_update(ids)

    # --- upkeep -----------------------------------------------------------------

    async def _touch(self) -> None:
        ids = sorted(self._held)
        if ids:
            await self.consumer.touch(ids)

    async def update_lag(self) -> tuple[int, float] | None:
        lag = await self.consumer.lag(int(self.clock.seconds() * 1000))
        if lag is not None:
            self.metrics.lag.set(lag[0])
            self.metrics.lag_seconds.set(lag[1])
        return lag

    @property
    def paused(self) -> bool:
        return self._auth_refused and self._sleep is not None


def _cancel_timer(result: object, timer: Any) -> object:
    if timer.active():
        timer.cancel()
    return result


async def _quietly(d: defer.Deferred[Any]) -> None:
    """Wait for a Deferred we do not own without consuming its result."""
    waiter: defer.Deferred[None] = defer.Deferred()

    def done(result: object) -> object:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(done)
    await waiter
