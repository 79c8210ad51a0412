# -*- test-case-name: tests.test_feeder -*-
"""The feeder end to end: a real redis-server, the fake Ingest API (or a file/webhook).

Time that the feeder decides (batch age, backoff, Retry-After, the auth pause) runs
on a ``task.Clock`` where the test needs it; Redis and HTTP run on the real reactor.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import hmac
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sparkytwist.config import Settings
from sparkytwist.feeder.consumer import StreamConsumer
from sparkytwist.feeder.pipeline import AGE_MARGIN, Feeder
from sparkytwist.feeder.service import FeederService, build_feeder
from sparkytwist.feeder.sinks import SIGNATURE_HEADER
from sparkytwist.metrics import Metrics
from sparkytwist.redis import Redis, RedisUnavailable
from sparkytwist.service import Context
from sparkytwist.store import FEEDER_GROUP, Keys
from sparkytwist.trackevent import TrackEvent
from tests.support import mmdb
from tests.support.fake_ingest import FakeIngest, listen_fake_ingest, validate_line
from tests.support.redis import fresh_redis

KEY = "feeder-test-ingest-key"
WAIT = 10.0
MSG = "65f0a1b2c3d4e5f6a7b8"


def hit(i: int, *, ts_ms: int | None = None, ip: str = "203.0.113.7",
        rcpt: str | None = None, msg: str = MSG) -> TrackEvent:
    click = i % 3 == 2
    return TrackEvent(
        "click" if click else "open", msg, rcpt or f"user{i}@example.com",
        int(time.time() * 1000) if ts_ms is None else ts_ms, ip,
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
        url=f"https://shop.example.com/item/{i}" if click else "")


async def add_events(redis: Redis, keys: Keys, events: list[TrackEvent]) -> list[bytes]:
    ids = []
    for ev in events:
        flat: list[bytes] = []
        for k, v in ev.to_fields().items():
            flat += [k, v]
        ids.append(await redis.execute("XADD", keys.events, "*", *flat))
    return ids


async def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll on the real reactor until ``check()``; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


def event_ids(fake: FakeIngest) -> collections.Counter[str]:
    return collections.Counter(ev["event_id"] for ev in fake.events)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"sparkytwist_{name}", labels)
    return 0.0 if value is None else value


class FeederTestBase(TestCase):
    timeout = 60

    async def set_up(self) -> None:
        self.redis = await fresh_redis(self)
        self.keys = Keys("t:")
        self.port, self.fake = listen_fake_ingest(reactor, api_key=KEY, testcase=self)
        self.metrics = Metrics()

    def http(self) -> HTTPClient:
        pool = HTTPConnectionPool(reactor, persistent=False)
        return HTTPClient(Agent(reactor, pool=pool))

    def settings(self, **changes: Any) -> Settings:
        base = dict(sparkpost_api_key=KEY, sparkpost_host=self.fake.url, feeder_name="f1",
                    batch_max_age=0.0)
        base.update(changes)
        return replace(Settings(), **base)

    def start(self, settings: Settings | None = None, *, clock: Any = None,
              metrics: Metrics | None = None, **overrides: Any) -> Feeder:
        made = build_feeder(
            settings or self.settings(), redis=self.redis, keys=self.keys,
            metrics=metrics or self.metrics, reactor=reactor, clock=clock, http=self.http(),
            rng=random.Random(7), **overrides)
        assert isinstance(made, FeederService), made
        made.startService()
        self.addCleanup(lambda: made.stopService() if made.running else None)
        return made.feeder

    async def pending(self) -> int:
        summary = await self.redis.execute("XPENDING", self.keys.events, FEEDER_GROUP)
        return int(summary[0])


class BatchingTests(FeederTestBase):
    async def test_batches_cut_by_size_never_exceed_it(self) -> None:
        await self.set_up()
        clock = task.Clock()
        await add_events(self.redis, self.keys, [hit(i) for i in range(40)])
        feeder = self.start(self.settings(batch_max_bytes=4000, batch_max_age=30.0),
                            clock=clock)
        await feeder.settle()
        # Every batch the size limit closed went out at once, each within the limit...
        self.assertGreaterEqual(len(self.fake.batches), 3)
        self.assertTrue(all(b.raw_size <= 4000 for b in self.fake.batches))
        sent = len(self.fake.events)
        self.assertLess(sent, 40)
        # ...and the remainder waits for its age.
        clock.advance(30)
        await feeder.settle()
        await self.fake.wait_for_events(40, WAIT)
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        self.assertEqual(len(event_ids(self.fake)), 40)
        self.assertEqual(await self.pending(), 0)

    async def test_a_small_batch_waits_for_its_age(self) -> None:
        await self.set_up()
        clock = task.Clock()
        feeder = self.start(self.settings(batch_max_age=30.0), clock=clock)
        await feeder.settle()
        await add_events(self.redis, self.keys, [hit(i) for i in range(3)])
        clock.advance(1)  # a tick reads them: the batch starts now
        await feeder.settle()
        self.assertEqual(await self.pending(), 3)
        clock.advance(29)  # 29 s old
        await feeder.settle()
        self.assertEqual(self.fake.requests, [])
        clock.advance(1)  # 30 s old
        await feeder.settle()
        events = await self.fake.wait_for_events(3, WAIT)
        self.assertEqual(len(self.fake.batches), 1)
        self.assertEqual({e["rcpt_to"] for e in events},
                         {f"user{i}@example.com" for i in range(3)})
        request = self.fake.requests[0]
        self.assertEqual(request.headers["authorization"], [KEY])
        self.assertEqual(request.headers["content-encoding"], ["gzip"])
        await wait_until(lambda: metric(self.metrics, "feeder_events_sent_total",
                                        sink="sparkpost") == 3, "the sent counter")
        self.assertEqual(await self.pending(), 0)


class RetryTests(FeederTestBase):
    async def test_500_then_200_delivers_each_event_once(self) -> None:
        await self.set_up()
        clock = task.Clock()
        self.fake.enqueue(500)
        ids = await add_events(self.redis, self.keys, [hit(i) for i in range(5)])
        feeder = self.start(clock=clock)
        await self.fake.wait_for_requests(1, WAIT)
        await wait_until(lambda: feeder._sleep is not None, "the backoff")
        self.assertEqual(await self.pending(), 5)  # not acked after a 500
        clock.advance(1.0)  # first backoff: 0.5-1 s
        events = await self.fake.wait_for_events(5, WAIT)
        await feeder.settle()
        self.assertEqual([r.status for r in self.fake.requests], [500, 200])
        self.assertEqual(len(events), 5)
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        # The retry carried the same bytes, hence the same event ids.
        self.assertEqual(self.fake.requests[0].body, self.fake.requests[1].body)
        self.assertEqual(len(ids), 5)
        self.assertEqual(await self.pending(), 0)
        self.assertEqual(metric(self.metrics, "feeder_retries_total", sink="sparkpost"), 1)
        self.assertEqual(metric(self.metrics, "feeder_batches_total", sink="sparkpost",
                                status="500"), 1)
        self.assertEqual(metric(self.metrics, "feeder_batches_total", sink="sparkpost",
                                status="200"), 1)

    async def test_redis_failing_while_facts_are_looked_up_loses_nothing(self) -> None:
        """The batch's events go back and are sent on a later cycle, exactly once."""
        await self.set_up()
        clock = task.Clock()
        await add_events(self.redis, self.keys, [hit(i) for i in range(3)])
        feeder = self.start(clock=clock)
        real, failures = feeder.consumer.delivery_facts, []

        async def failing_once(*args: Any) -> Any:
            if not failures:
                failures.append(1)
                raise RedisUnavailable("no answer from Redis within 2s")
            return await real(*args)

        feeder.consumer.delivery_facts = failing_once  # type: ignore[method-assign]
        for _ in range(20):
            clock.advance(1)
            await feeder.settle()
            if len(self.fake.events) >= 3:
                break
        events = await self.fake.wait_for_events(3, WAIT)
        self.assertEqual(failures, [1])
        self.assertEqual(len(events), 3)
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        self.assertEqual(await self.pending(), 0)

    async def test_429_retry_after_is_honoured(self) -> None:
        await self.set_up()
        clock = task.Clock()
        self.fake.enqueue(429, {"Retry-After": "120"})
        await add_events(self.redis, self.keys, [hit(i) for i in range(2)])
        feeder = self.start(clock=clock)
        await self.fake.wait_for_requests(1, WAIT)
        await wait_until(lambda: feeder._sleep is not None, "the backoff")
        clock.advance(119)
        self.assertEqual(len(self.fake.requests), 1)
        self.assertIsNotNone(feeder._sleep)  # still waiting: Retry-After is a floor
        clock.advance(1.5)
        await self.fake.wait_for_events(2, WAIT)
        await feeder.settle()
        self.assertEqual(await self.pending(), 0)

    async def test_connection_refused_is_retried(self) -> None:
        await self.set_up()
        clock = task.Clock()
        await add_events(self.redis, self.keys, [hit(0)])
        dead_port = self.port.getHost().port
        await self.port.stopListening()
        feeder = self.start(self.settings(sparkpost_host=f"http://127.0.0.1:{dead_port}"),
                            clock=clock)
        await wait_until(lambda: feeder._sleep is not None, "the backoff")
        self.assertEqual(metric(self.metrics, "feeder_batches_total", sink="sparkpost",
                                status="error"), 1)
        self.assertEqual(await self.pending(), 1)


class RejectionTests(FeederTestBase):
    async def test_401_dead_letters_the_batch_and_pauses(self) -> None:
        await self.set_up()
        clock = task.Clock()
        self.fake.enqueue(401, body=b'{"errors":[{"message":"Unauthorized."}]}')
        await add_events(self.redis, self.keys, [hit(i) for i in range(3)])
        feeder = self.start(clock=clock, auth_pause=600.0)
        await self.fake.wait_for_requests(1, WAIT)
        await wait_until(lambda: feeder.paused, "the pause")
        dead = await self.redis.execute("XRANGE", self.keys.dead_letters, "-", "+")
        self.assertEqual(len(dead), 1)
        it = iter(dead[0][1])
        fields = dict(zip(it, it, strict=True))
        self.assertEqual(fields[b"status"], b"401")
        self.assertIn(b"Unauthorized", fields[b"response"])
        self.assertEqual(fields[b"events"], b"3")
        lines = gzip.decompress(fields[b"batch"]).splitlines()
        self.assertEqual(len(lines), 3)
        self.assertEqual(await self.pending(), 0)  # dead-lettered, so acknowledged
        self.assertEqual(metric(self.metrics, "feeder_paused"), 1)
        self.assertEqual(metric(self.metrics, "feeder_dead_lettered_events_total",
                                sink="sparkpost"), 3)
        # Paused: new events wait in the stream, nothing is sent.
        await add_events(self.redis, self.keys, [hit(i) for i in range(3, 6)])
        clock.advance(599)
        self.assertEqual(len(self.fake.requests), 1)
        # A second refusal in the same episode keeps the batch instead of burning it.
        self.fake.enqueue(403)
        clock.advance(1)
        await self.fake.wait_for_requests(2, WAIT)
        await wait_until(lambda: feeder._sleep is not None, "the second pause")
        self.assertEqual(len(await self.redis.execute(
            "XRANGE", self.keys.dead_letters, "-", "+")), 1)
        self.assertEqual(await self.pending(), 3)
        clock.advance(600)  # the key works again
        await self.fake.wait_for_events(3, WAIT)
        await feeder.settle()
        self.assertFalse(feeder.paused)
        self.assertEqual(metric(self.metrics, "feeder_paused"), 0)
        self.assertEqual(await self.pending(), 0)

    async def test_400_dead_letters_and_goes_on(self) -> None:
        await self.set_up()
        self.fake.enqueue(413)
        await add_events(self.redis, self.keys, [hit(0)])
        feeder = self.start()
        await self.fake.wait_for_requests(1, WAIT)
        await feeder.settle()
        self.assertFalse(feeder.paused)
        await add_events(self.redis, self.keys, [hit(1)])
        await self.fake.wait_for_events(1, WAIT)
        self.assertEqual(self.fake.events[0]["rcpt_to"], "user1@example.com")
        dead = await self.redis.execute("XRANGE", self.keys.dead_letters, "-", "+")
        self.assertEqual(len(dead), 1)


class TakeoverTests(FeederTestBase):
    async def abandon_a_batch(self, name: str) -> list[bytes]:
        hold = self.fake.hold_next()
        ids = await add_events(self.redis, self.keys, [hit(i) for i in range(4)])
        feeder = self.start(self.settings(feeder_name=name), stop_grace=0.0)
        await hold.arrived
        await feeder.stop()  # abrupt: the request on the wire is dropped
        await hold.gone
        self.assertEqual(self.fake.events, [])
        self.assertEqual(await self.pending(), 4)  # nothing acknowledged
        return ids

    async def test_a_live_feeder_claims_a_dead_feeders_batch(self) -> None:
        await self.set_up()
        await self.abandon_a_batch("dead")
        self.start(self.settings(feeder_name="live", claim_idle=0.3))
        await self.fake.wait_for_events(4, WAIT)
        await wait_until(lambda: self.fake.requests[-1].status == 200, "the answer")
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        await wait_until(lambda: metric(self.metrics, "feeder_claimed_entries_total") == 4,
                         "the claim counter")
        deadline = reactor.seconds() + WAIT
        while await self.pending() and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(await self.pending(), 0)

    async def test_a_restarted_feeder_resends_its_own_pending_first(self) -> None:
        await self.set_up()
        await self.abandon_a_batch("same")
        await add_events(self.redis, self.keys, [hit(10)])
        # A long claim_idle: only "my own pending entries" can explain a quick resend.
        feeder = self.start(self.settings(feeder_name="same", claim_idle=3600.0))
        await self.fake.wait_for_events(5, WAIT)
        await feeder.settle()
        sent = [e["rcpt_to"] for b in self.fake.batches for e in b.events]
        self.assertEqual(sent, [f"user{i}@example.com" for i in (0, 1, 2, 3, 10)])
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        self.assertEqual(await self.pending(), 0)

    async def test_two_feeders_share_the_stream_without_duplicates(self) -> None:
        await self.set_up()
        n = 300
        await add_events(self.redis, self.keys, [hit(i) for i in range(n)])
        a = self.start(self.settings(feeder_name="a", batch_max_bytes=5000), read_count=20)
        b = self.start(self.settings(feeder_name="b", batch_max_bytes=5000), read_count=20)
        await self.fake.wait_for_events(n, WAIT)
        await a.settle()
        await b.settle()
        counts = event_ids(self.fake)
        self.assertEqual(len(counts), n)
        self.assertEqual(set(counts.values()), {1})
        self.assertEqual(await self.pending(), 0)

    async def test_stop_finishes_the_upload_on_the_wire(self) -> None:
        await self.set_up()
        hold = self.fake.hold_next()
        await add_events(self.redis, self.keys, [hit(i) for i in range(2)])
        feeder = self.start(stop_grace=WAIT)
        await hold.arrived
        stopped = feeder.stop()
        self.assertFalse(stopped.called)
        hold.release()
        await stopped
        self.assertEqual(len(self.fake.events), 2)
        self.assertEqual(await self.pending(), 0)


class PipelineTests(FeederTestBase):
    """The next batch is read and built while one is on the wire; each batch is
    acknowledged only after its own 200."""

    async def read_by_the_group(self) -> int:
        """Entries delivered to the group so far (pending + acknowledged)."""
        groups = await self.redis.execute("XINFO", "GROUPS", self.keys.events)
        info = dict(zip(groups[0][::2], groups[0][1::2], strict=True))
        read = await self.redis.execute("XRANGE", self.keys.events, "-",
                                        info[b"last-delivered-id"])
        return len(read)

    async def test_next_batch_is_prepared_but_not_acked_while_one_is_on_the_wire(self) -> None:
        await self.set_up()
        hold = self.fake.hold_next()
        n = 60
        await add_events(self.redis, self.keys, [hit(i) for i in range(n)])
        feeder = self.start(self.settings(batch_max_bytes=4000), read_count=5)
        await hold.arrived
        first = len(self.fake.requests)
        # Reading goes on (with read-ahead) while the first batch waits for its answer...
        await wait_until(lambda: len(feeder.builder) > 0, "the next batch")
        await task.deferLater(reactor, 0.2, lambda: None)
        read = await self.read_by_the_group()
        self.assertGreater(read, 5)
        # ...but nothing is acknowledged and no second batch goes before the 200.
        self.assertEqual(await self.pending(), read)
        self.assertEqual(len(self.fake.requests), first)
        hold.release()
        await self.fake.wait_for_events(n, WAIT)
        await feeder.settle()
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        sent = [e["rcpt_to"] for b in self.fake.batches for e in b.events]
        self.assertEqual(sent, [f"user{i}@example.com" for i in range(n)])  # stream order
        self.assertEqual(await self.pending(), 0)

    async def test_stop_leaves_what_was_read_pending_for_the_next_start(self) -> None:
        await self.set_up()
        hold = self.fake.hold_next()
        n = 60
        await add_events(self.redis, self.keys, [hit(i) for i in range(n)])
        feeder = self.start(self.settings(feeder_name="same", batch_max_bytes=4000),
                            read_count=5, stop_grace=0.0)
        await hold.arrived
        await wait_until(lambda: len(feeder.builder) > 0, "the next batch")
        await feeder.stop()  # abrupt: the upload on the wire is dropped
        await hold.gone
        self.assertEqual(self.fake.events, [])
        self.assertEqual(await self.pending(), await self.read_by_the_group())
        again = self.start(self.settings(feeder_name="same", batch_max_bytes=4000,
                                         claim_idle=3600.0))
        await self.fake.wait_for_events(n, WAIT)
        await again.settle()
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        self.assertEqual(len(event_ids(self.fake)), n)
        self.assertEqual(await self.pending(), 0)

    async def test_a_retried_batch_holds_back_the_next_one(self) -> None:
        await self.set_up()
        clock = task.Clock()
        self.fake.enqueue(500)
        n = 30
        await add_events(self.redis, self.keys, [hit(i) for i in range(n)])
        feeder = self.start(self.settings(batch_max_bytes=4000), clock=clock, read_count=5)
        await self.fake.wait_for_requests(1, WAIT)
        await wait_until(lambda: feeder._sleep is not None, "the backoff")
        await wait_until(lambda: len(feeder.builder) > 0, "the next batch")
        self.assertEqual(await self.pending(), await self.read_by_the_group())
        self.assertEqual(len(self.fake.requests), 1)
        clock.advance(1.0)  # first backoff: 0.5-1 s
        await self.fake.wait_for_events(n, WAIT)
        await feeder.settle()
        self.assertEqual(set(event_ids(self.fake).values()), {1})
        self.assertEqual(await self.pending(), 0)


class ConsumerTests(FeederTestBase):
    async def test_ack_of_thousands_of_ids(self) -> None:
        await self.set_up()
        consumer = StreamConsumer(self.redis, self.keys, FEEDER_GROUP, "x")
        await consumer.ensure_group()
        await defer.gatherResults([
            self.redis.execute("XADD", self.keys.events, "*", "a", str(i))
            for i in range(2500)])
        entries = await consumer.read_new(3000)
        self.assertEqual(len(entries), 2500)
        ids = [entry_id for entry_id, _ in entries]
        # Ids not pending (already acknowledged, never read) are not counted.
        self.assertEqual(await consumer.ack(ids[:10]), 10)
        self.assertEqual(await consumer.ack([*ids, b"1-1"]), 2490)
        self.assertEqual(await self.pending(), 0)

    async def test_delivery_facts_of_many_keys_and_of_a_key_with_a_nul(self) -> None:
        await self.set_up()
        consumer = StreamConsumer(self.redis, self.keys, FEEDER_GROUP, "x")
        plain, odd, missing = b"t:acct:m1:a@x", b"t:acct:m\x002:b@x", b"t:acct:m3:c@x"
        await self.redis.execute("HSET", plain, "campaign_id", "c1", "other", "x")
        await self.redis.execute("HSET", odd, "campaign_id", "c\u00e42", "ip_pool", "p2")
        fields = ["campaign_id", "ip_pool"]
        self.assertEqual(await consumer.delivery_facts([plain, missing, plain], fields),
                         [["c1", False], [False, False], ["c1", False]])
        self.assertEqual(await consumer.delivery_facts([odd, plain], fields),
                         [["c\u00e42", "p2"], ["c1", False]])
        self.assertEqual(await consumer.delivery_facts([], fields), [])

    async def test_fields_that_are_not_utf8_reach_the_line_as_replacement(self) -> None:
        await self.set_up()
        fields = {**hit(0).to_fields(), b"ua": b"Mozilla/5.0 \xff\xfe bad"}
        flat: list[bytes] = []
        for k, v in fields.items():
            flat += [k, v]
        await self.redis.execute("XADD", self.keys.events, "*", *flat)
        feeder = self.start()
        events = await self.fake.wait_for_events(1, WAIT)
        await feeder.settle()
        self.assertEqual(events[0]["user_agent"], "Mozilla/5.0 \ufffd\ufffd bad")
        self.assertEqual(self.fake.violations, [])


class EnrichmentTests(FeederTestBase):
    async def test_delivery_facts_and_geo_are_joined(self) -> None:
        await self.set_up()
        path = mmdb.write_city_mmdb(self.mktemp() + ".mmdb")
        await self.redis.execute(
            "HSET", self.keys.delivery(MSG, "Fred@Example.com"),
            "campaign_id", "spring-sale", "subaccount_id", "42", "friendly_from",
            "news@shop.example.com", "sending_ip", "198.51.100.9", "ip_pool", "pool1",
            "routing_domain", "example.com", "delivered_at", "1700000000")
        await add_events(self.redis, self.keys, [
            hit(0, rcpt="Fred@Example.com", ip=mmdb.US_IP),
            hit(1, rcpt="other@example.com", ip=mmdb.UNKNOWN_IP),
            hit(2, rcpt="fred@example.com", ip=mmdb.DE_IP),
        ])
        self.start(self.settings(geoip_database=path))
        events = {e["raw_rcpt_to"]: e for e in await self.fake.wait_for_events(3, WAIT)}
        fred = events["Fred@Example.com"]
        self.assertEqual(fred["campaign_id"], "spring-sale")
        self.assertEqual(fred["subaccount_id"], 42)
        self.assertEqual(fred["friendly_from"], "news@shop.example.com")
        self.assertEqual(fred["sending_ip"], "198.51.100.9")
        self.assertEqual(fred["ip_pool"], "pool1")
        self.assertEqual(fred["routing_domain"], "example.com")
        self.assertNotIn("delivered_at", fred)
        self.assertEqual(fred["geo_ip"], mmdb.US_GEO)
        # The recipient's case does not matter for the join (the store folds it).
        self.assertEqual(events["fred@example.com"]["campaign_id"], "spring-sale")
        self.assertEqual(events["fred@example.com"]["geo_ip"], mmdb.DE_GEO)
        other = events["other@example.com"]
        self.assertNotIn("campaign_id", other)  # no delivery facts: not an error
        self.assertNotIn("geo_ip", other)

    async def test_events_older_than_a_day_are_dropped_and_counted(self) -> None:
        await self.set_up()
        old_ms = int((time.time() - 86400 - AGE_MARGIN - 5) * 1000)
        await add_events(self.redis, self.keys, [hit(0, ts_ms=old_ms), hit(1), hit(2)])
        feeder = self.start()
        events = await self.fake.wait_for_events(2, WAIT)
        await feeder.settle()
        self.assertEqual({e["rcpt_to"] for e in events},
                         {"user1@example.com", "user2@example.com"})
        self.assertEqual(metric(self.metrics, "feeder_dropped_events_total",
                                reason="too_old"), 1)
        self.assertEqual(await self.pending(), 0)

    async def test_malformed_and_trimmed_entries_are_acked_and_counted(self) -> None:
        await self.set_up()
        consumer = StreamConsumer(self.redis, self.keys, FEEDER_GROUP, "f1")
        await consumer.ensure_group()
        await self.redis.execute("XADD", self.keys.events, "*", "type", "open")  # no msg
        ids = await add_events(self.redis, self.keys, [hit(0), hit(1)])
        await consumer.read_new(10)  # pending for f1, then cut by the stream cap
        await self.redis.execute("XDEL", self.keys.events, ids[0])
        feeder = self.start()
        await self.fake.wait_for_events(1, WAIT)
        await feeder.settle()
        self.assertEqual(metric(self.metrics, "feeder_dropped_events_total",
                                reason="malformed"), 1)
        self.assertEqual(metric(self.metrics, "feeder_dropped_events_total",
                                reason="trimmed"), 1)
        self.assertEqual(await self.pending(), 0)

    async def test_lag_counts_pending_and_unread(self) -> None:
        await self.set_up()
        consumer = StreamConsumer(self.redis, self.keys, FEEDER_GROUP, "x")
        self.assertIsNone(await consumer.lag(0))
        await consumer.ensure_group()
        ts = int(time.time() * 1000) - 5000
        for i in range(10):
            await self.redis.execute("XADD", self.keys.events, f"{ts + i}-0", "a", "1")
        await consumer.read_new(3)
        lag = await consumer.lag(ts + 5000)
        assert lag is not None
        self.assertEqual(lag[0], 10)
        self.assertAlmostEqual(lag[1], 5.0, delta=0.01)
        await consumer.ack([f"{ts + i}-0".encode() for i in range(3)])
        lag = await consumer.lag(ts + 5000)
        assert lag is not None
        self.assertEqual(lag[0], 7)
        self.assertAlmostEqual(lag[1], 4.997, delta=0.01)


class SinkTests(FeederTestBase):
    async def test_file_sink_writes_one_gzip_file_per_batch(self) -> None:
        await self.set_up()
        directory = self.mktemp()
        ids = await add_events(self.redis, self.keys, [hit(i) for i in range(3)])
        feeder = self.start(self.settings(sink="file", sink_dir=directory,
                                          sparkpost_api_key=""))
        await wait_until(lambda: os.path.isdir(directory) and bool(os.listdir(directory)),
                         "the batch file")
        await feeder.settle()
        names = os.listdir(directory)
        self.assertEqual(names, [f"events-{ids[0].decode()}_{ids[-1].decode()}.ndjson.gz"])
        with open(os.path.join(directory, names[0]), "rb") as f:
            lines = gzip.decompress(f.read()).splitlines()
        self.assertEqual(len(lines), 3)
        for line in lines:
            self.assertEqual(validate_line(json.loads(line), time.time()), [])
        self.assertEqual(await self.pending(), 0)

    async def test_webhook_sink_signs_the_body(self) -> None:
        await self.set_up()
        received: list[tuple[dict[str, str], bytes]] = []

        class Hook(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> bytes:
                headers = {k.decode().lower(): v[0].decode()
                           for k, v in request.requestHeaders.getAllRawHeaders()}
                received.append((headers, request.content.read()))
                request.setResponseCode(202)
                return b"ok"

        port = reactor.listenTCP(0, Site(Hook()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/hook"
        await add_events(self.redis, self.keys, [hit(i) for i in range(4)])
        feeder = self.start(self.settings(sink="webhook", webhook_url=url,
                                          webhook_secret="s3cret", sparkpost_api_key=""))
        await wait_until(lambda: bool(received), "the webhook request")
        await feeder.settle()
        headers, body = received[0]
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        self.assertEqual(headers[SIGNATURE_HEADER.lower()], f"sha256={expected}")
        self.assertEqual(headers["content-encoding"], "gzip")
        self.assertEqual(headers["content-type"], "application/x-ndjson")
        self.assertNotIn("authorization", headers)
        self.assertEqual(len(gzip.decompress(body).splitlines()), 4)
        self.assertEqual(await self.pending(), 0)


class MakeServiceTests(TestCase):
    def context(self, **changes: Any) -> Context:
        settings = replace(Settings(), **changes)
        redis = Redis(timeout=1.0, clock=reactor, url="redis://127.0.0.1:1")
        return Context(settings=settings, reactor=reactor, redis=redis, metrics=Metrics(),
                       keys=Keys(), codec=None)  # type: ignore[arg-type]

    def test_no_api_key_is_a_reason_not_a_service(self) -> None:
        from sparkytwist.feeder.service import make_service

        made = make_service(self.context(sparkpost_api_key=""))
        assert isinstance(made, str)
        self.assertIn("API key", made)
        self.assertIn("SPARKPOST_API_KEY_INGEST", made)

    def test_registered_with_sparkytrack(self) -> None:
        from sparkytwist.tap import PART_FACTORIES

        self.assertEqual(PART_FACTORIES["feeder"], "sparkytwist.feeder.service:make_service")

    def test_a_key_gives_a_service(self) -> None:
        from sparkytwist.feeder.service import make_service

        made = make_service(self.context(sparkpost_api_key="k", feeder_name="n1"))
        assert isinstance(made, FeederService)
        self.assertEqual(made.feeder.consumer.name, "n1")
        self.assertEqual(made.feeder.sink.url,  # type: ignore[attr-defined]
                         "https://api.sparkpost.com/api/v1/ingest/events")
