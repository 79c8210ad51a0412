"""The accounting reader: bytes → parser → writer, counts, rate-limited logs, pausing."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.accounting.reader import AccountingReader
from sparkytwist.accounting.stats import Stats
from sparkytwist.accounting.writer import DeliveryWriter
from sparkytwist.metrics import Metrics
from sparkytwist.redis import RedisUnavailable
from sparkytwist.store import Keys
from tests.test_accounting_writer import FakeRedis

SAMPLE = (Path(__file__).parent / "data" / "acct" / "sample.csv").read_bytes()
HEADER = b"type,timeLogged,orig,rcpt,header_x-sp-message-id,jobId\r\n"


def d_line(i: int, rcpt: str = "") -> bytes:
    rcpt = rcpt or f"user{i}@example.com"
    return f"d,2020-04-01 12:34:56+0100,bounces@example.com,{rcpt},{i:020x},job\r\n".encode()


class Harness:
    def __init__(self, metrics: Metrics | None = None, **writer_options: Any) -> None:
        self.clock = Clock()
        self.redis = FakeRedis()
        self.stats = Stats(metrics)
        self.writer = DeliveryWriter(self.redis, Keys(), ttl=60, clock=self.clock,  # type: ignore[arg-type]
                                     stats=self.stats, **writer_options)
        self.reader = AccountingReader(self.writer, self.stats, self.clock)

    def stored_keys(self) -> list[bytes]:
        self.writer.flush()
        return self.redis.succeed_all()


def capture_logs(test: SynchronousTestCase) -> list[str]:
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("sparkytwist.accounting"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


class ReaderTests(SynchronousTestCase):
    def test_sample_delivery_facts_stored_others_counted_by_type(self) -> None:
        h = Harness()
        for off in range(0, len(SAMPLE), 777):
            h.reader.feed(SAMPLE[off : off + 777])
        h.reader.finish()
        keys = h.stored_keys()
        self.assertEqual(len(keys), 8)
        self.assertIn(b"sparky:acct:5e847c41b2c3d4e5f6a7:bob.smith@outlook.com", keys)
        self.assertIn(b"sparky:acct:5e848288c4d5e6f7a8b9:sybil@example.org", keys)
        s = h.stats
        self.assertEqual(s.read_by_type, {"b": 3, "d": 10, "f": 1, "r": 4, "rb": 1, "rs": 1,
                                          "t": 3, "tq": 2})
        self.assertEqual(s.skipped_by_type, {"b": 3, "d": 2, "f": 1, "r": 4, "rb": 1, "rs": 1,
                                             "t": 3, "tq": 2})
        self.assertEqual(s.skipped_by_reason, {"not-delivery": 15, "no-message-id": 1,
                                               "bad-message-id": 1})
        self.assertEqual((s.stored, s.malformed), (8, 0))
        self.assertIn("25 records read", s.summary())
        self.assertIn("8 stored", s.summary())

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=len(SAMPLE)), max_size=12))
    def test_any_chunking_stores_the_same(self, cuts: list[int]) -> None:
        h = Harness()
        points = [0, *sorted(set(cuts)), len(SAMPLE)]
        for a, b in itertools.pairwise(points):
            h.reader.feed(SAMPLE[a:b])
        h.reader.finish()
        self.assertEqual(len(set(h.stored_keys())), 8)
        self.assertEqual(h.stats.read, 25)

    def test_malformed_lines_counted_and_logged_at_most_every_10s(self) -> None:
        logs = capture_logs(self)
        h = Harness()
        h.reader.feed(HEADER + d_line(1))
        bad = b"d,too,few,secret@example.com\r\n"
        h.reader.feed(bad + bad)
        self.assertEqual(len(logs), 1)
        self.assertIn("2 since the last report", logs[0])
        h.clock.advance(5)
        h.reader.feed(bad)
        self.assertEqual(len(logs), 1)  # inside the 10 s window: only counted
        h.clock.advance(5.5)
        h.reader.feed(bad + d_line(2))
        self.assertEqual(len(logs), 2)
        self.assertIn("2 since the last report, 4 in all", logs[1])
        self.assertIn("field-count", logs[1])
        self.assertFalse(any("secret@" in line for line in logs))  # never field values
        self.assertEqual(h.stats.malformed_by_reason, {"field-count": 4})
        self.assertEqual(len(h.stored_keys()), 2)  # reading went on

    def test_data_before_any_header_is_a_clear_counted_error(self) -> None:
        logs = capture_logs(self)
        h = Harness()
        h.reader.feed(d_line(1) + d_line(2))
        self.assertEqual(h.stats.malformed_by_reason, {"before-header": 2})
        self.assertEqual(len(logs), 1)
        self.assertIn("before any header", logs[0])
        h.reader.feed(HEADER + d_line(3))
        self.assertEqual(h.stored_keys(), [b"sparky:acct:00000000000000000003:user3@example.com"])

    def test_writer_backpressure_pauses_and_resumes_the_producer(self) -> None:
        h = Harness(batch_size=2, max_in_flight=1)
        transport = StringTransport()
        h.reader.attach(transport)
        h.reader.feed(HEADER + d_line(1) + d_line(2))
        self.assertEqual(transport.producerState, "producing")
        h.redis.answers[0].errback(RedisUnavailable("down"))
        self.assertEqual(transport.producerState, "paused")
        # A producer attached while paused (a restarted command) is paused at once.
        h.reader.detach()
        second = StringTransport()
        h.reader.attach(second)
        self.assertEqual(second.producerState, "paused")
        h.clock.advance(1)  # retry
        h.redis.answers[1].callback(0)
        self.assertEqual(second.producerState, "producing")
        self.assertEqual(h.stats.stored, 2)

    def test_metrics_exported(self) -> None:
        metrics = Metrics()
        h = Harness(metrics)
        h.reader.feed(SAMPLE + b"d,bad\r\n")
        h.stored_keys()
        text = metrics.exposition().decode()
        self.assertIn('sparkytwist_acct_records_total{type="d"} 10.0', text)
        self.assertIn("sparkytwist_acct_stored_total 8.0", text)
        self.assertIn('sparkytwist_acct_skipped_total{reason="not-delivery"} 15.0', text)
        self.assertIn('sparkytwist_acct_malformed_total{reason="field-count"} 1.0', text)
        self.assertIn("sparkytwist_acct_batches_total 1.0", text)
        for name in ("acct_write_failures_total", "acct_paused_seconds_total",
                     "acct_command_restarts_total"):
            self.assertIn(f"sparkytwist_{name} 0.0", text)
