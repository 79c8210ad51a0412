"""The batching writer: one script call per batch, backpressure, retries without loss."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sparkytwist.accounting.stats import Stats
from sparkytwist.accounting.writer import FIELDS, DeliveryWriter
from sparkytwist.acctcsv import DeliveryFacts
from sparkytwist.backoff import Backoff
from sparkytwist.metrics import Metrics
from sparkytwist.redis import RedisUnavailable
from sparkytwist.store import Keys
from tests.support.redis import fresh_redis


def facts(i: int, **changes: Any) -> DeliveryFacts:
    values: dict[str, Any] = {
        "message_id": f"{i:020x}", "rcpt": f"User{i}@Example.com",
        "friendly_from": "bounces@mail.example.com", "campaign_id": "spring",
        "subaccount_id": 42, "sending_ip": "203.0.113.10", "ip_pool": "pool-a",
        "routing_domain": "example.com", "delivered_at": 1585740896}
    values.update(changes)
    return DeliveryFacts(**values)


class FakeRedis:
    """Records every command; each answer is a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answers: list[defer.Deferred[Any]] = []

    def execute(self, *args: Any) -> defer.Deferred[Any]:
        self.calls.append(args)
        d: defer.Deferred[Any] = defer.Deferred()
        self.answers.append(d)
        return d

    def succeed_all(self) -> list[bytes]:
        """Answer every open call (and those it starts) with success; their keys."""
        written = []
        i = 0
        while i < len(self.answers):
            if not self.answers[i].called:
                written += self.keys_of(self.calls[i])
                self.answers[i].callback(0)
            i += 1
        return written

    def keys_of(self, call: tuple[Any, ...]) -> list[bytes]:
        n = call[2]
        return list(call[3 : 3 + n])


class Flow:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pause(self) -> None:
        self.events.append("pause")

    def resume(self) -> None:
        self.events.append("resume")


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis()
        self.stats = Stats(Metrics())
        self.flow = Flow()

    def writer(self, **options: Any) -> DeliveryWriter:
        options.setdefault("batch_size", 10)
        w = DeliveryWriter(self.redis, Keys("t:"), ttl=864000.0, clock=self.clock,  # type: ignore[arg-type]
                           stats=self.stats, **options)
        w.set_flow(self.flow.pause, self.flow.resume)
        return w

    def test_one_script_call_per_batch_with_keys_and_values(self) -> None:
        w = self.writer()
        w.write([facts(i) for i in range(25)])
        # Two full batches go at once; the rest waits for max_delay.
        self.assertEqual(len(self.redis.calls), 2)
        call = self.redis.calls[0]
        self.assertEqual(call[0], "EVALSHA")
        self.assertEqual(call[2], 10)
        self.assertEqual(self.redis.keys_of(call)[0],
                         b"t:acct:00000000000000000000:user0@example.com")
        ttl, data = call[3 + 10:]
        self.assertEqual(ttl, "864000")
        rows = data.split("\0")
        self.assertEqual(len(rows), 10 * len(FIELDS) + 1)
        self.assertEqual(rows[:7], ["spring", "42", "bounces@mail.example.com", "203.0.113.10",
                                    "pool-a", "example.com", "1585740896"])
        self.clock.advance(w.max_delay)
        self.assertEqual(len(self.redis.calls), 3)
        self.assertEqual(self.redis.calls[2][2], 5)
        for d in self.redis.answers:
            d.callback(0)
        self.assertEqual((self.stats.stored, self.stats.batches, w.pending), (25, 3, 0))

    def test_bounded_batches_in_flight(self) -> None:
        w = self.writer(max_in_flight=2, high_water=1000)
        w.write([facts(i) for i in range(50)])
        self.assertEqual(len(self.redis.calls), 2)  # 3 more batches queued
        self.redis.answers[0].callback(0)
        self.assertEqual(len(self.redis.calls), 3)
        self.assertEqual(w.pending, 40)

    def test_too_many_waiting_pauses_then_resumes_at_half(self) -> None:
        w = self.writer(max_in_flight=1, high_water=30)
        w.write([facts(i) for i in range(29)])
        self.assertEqual(self.flow.events, [])
        w.write([facts(29)])
        self.assertEqual(self.flow.events, ["pause"])
        self.redis.answers[0].callback(0)  # 20 left: still above 15
        self.assertEqual(self.flow.events, ["pause"])
        self.redis.answers[1].callback(0)  # 10 left
        self.assertEqual(self.flow.events, ["pause", "resume"])

    def test_redis_down_pauses_retries_with_backoff_and_loses_nothing(self) -> None:
        w = self.writer(max_in_flight=2, backoff=Backoff(first=1.0, maximum=4.0))
        w.write([facts(i) for i in range(20)])
        self.redis.answers[0].errback(RedisUnavailable("down"))
        self.redis.answers[1].errback(RedisUnavailable("down"))
        self.assertEqual(self.flow.events, ["pause"])
        self.assertEqual(self.stats.write_failures, 2)
        self.assertTrue(w.redis_down)
        w.write([facts(i) for i in range(20, 25)])  # still accepted (bounded by the pause)
        self.clock.advance(0.999)
        self.assertEqual(len(self.redis.calls), 2)
        self.clock.advance(0.001)  # one probe at a time while down
        self.assertEqual(len(self.redis.calls), 3)
        self.redis.answers[2].errback(RedisUnavailable("still down"))
        self.clock.advance(1.999)
        self.assertEqual(len(self.redis.calls), 3)  # the backoff doubled
        self.clock.advance(0.001)
        self.assertEqual(len(self.redis.calls), 4)
        self.clock.advance(w.max_delay)  # the 5 late records form a batch of their own
        written = self.redis.succeed_all()
        self.assertEqual(self.flow.events, ["pause", "resume"])
        self.assertEqual((w.pending, self.stats.stored), (0, 25))
        self.assertEqual(len(written), 25)
        self.assertEqual(len(set(written)), 25)
        self.assertGreater(self.stats.paused_seconds, 2.9)

    def test_drain_fires_when_everything_is_written(self) -> None:
        w = self.writer()
        w.write([facts(i) for i in range(3)])
        drained = w.drain()  # flushes without waiting for max_delay
        self.assertEqual(len(self.redis.calls), 1)
        self.assertNoResult(drained)
        self.redis.answers[0].callback(0)
        self.successResultOf(drained)

    def test_stop_reports_what_was_not_written(self) -> None:
        w = self.writer()
        w.write([facts(i) for i in range(15)])
        self.redis.answers[0].errback(RedisUnavailable("down"))
        self.assertEqual(w.stop(), 15)
        self.clock.advance(60)
        self.assertEqual(len(self.redis.calls), 1)  # no retry after stop
        self.assertEqual(self.flow.events, ["pause"])  # stopping does not resume the input

    def test_refused_keys_are_counted_not_retried(self) -> None:
        w = self.writer()
        w.write([facts(i) for i in range(10)])
        self.redis.answers[0].callback(2)
        self.assertEqual((self.stats.stored, self.stats.rejected, w.pending), (8, 2, 0))


class ScriptTests(TestCase):
    """The Lua script against a real redis-server."""

    async def test_hash_fields_empty_ones_omitted_and_ttl(self) -> None:
        redis = await fresh_redis(self)
        stats = Stats()
        from twisted.internet import reactor

        w = DeliveryWriter(redis, Keys("sparky:"), ttl=3600.5, clock=reactor, stats=stats)
        w.write([
            facts(1),
            facts(2, campaign_id="", subaccount_id=None, delivered_at=None, ip_pool=""),
            facts(3, campaign_id="a\0b"),
        ])
        await w.drain()
        one = await redis.execute("HGETALL", b"sparky:acct:00000000000000000001:user1@example.com")
        self.assertEqual(dict(zip(one[::2], one[1::2], strict=True)), {
            b"campaign_id": b"spring", b"subaccount_id": b"42",
            b"friendly_from": b"bounces@mail.example.com", b"sending_ip": b"203.0.113.10",
            b"ip_pool": b"pool-a", b"routing_domain": b"example.com",
            b"delivered_at": b"1585740896"})
        two = await redis.execute("HGETALL", b"sparky:acct:00000000000000000002:user2@example.com")
        self.assertEqual(sorted(two[::2]), [b"friendly_from", b"routing_domain", b"sending_ip"])
        three = await redis.execute("HGET", b"sparky:acct:00000000000000000003:user3@example.com",
                                    "campaign_id")
        self.assertEqual(three, b"ab")
        ttl = int(await redis.execute("TTL", b"sparky:acct:00000000000000000001:user1@example.com"))
        self.assertTrue(3590 < ttl <= 3601, ttl)
        self.assertEqual(stats.stored, 3)

    async def test_key_of_another_type_is_refused_and_the_rest_stored(self) -> None:
        redis = await fresh_redis(self)
        from twisted.internet import reactor

        await redis.execute("SET", b"sparky:acct:00000000000000000001:user1@example.com", "x")
        stats = Stats()
        w = DeliveryWriter(redis, Keys("sparky:"), ttl=60, clock=reactor, stats=stats)
        w.write([facts(1), facts(2)])
        await w.drain()
        self.assertEqual((stats.stored, stats.rejected), (1, 1))
        self.assertEqual(int(await redis.execute("EXISTS", b"sparky:acct:00000000000000000002:"
                                                          b"user2@example.com")), 1)
