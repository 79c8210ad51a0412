# -*- test-case-name: tests.test_feeder_batch -*-
"""Batching decisions and backoff, without I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.events import UserAgentInfo, ndjson_line, sparkpost_event
from sparkytwist.feeder.batch import BatchBuilder, Item, estimate_line_size, pack
from sparkytwist.trackevent import TrackEvent

EV = TrackEvent("open", "65f0a1b2c3d4e5f6a7b8", "user@example.com", 1_700_000_000_000,
                "203.0.113.7", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0")


def built(n: int, size: int) -> list[Item]:
    return [Item(f"1-{i}".encode(), EV, b"x" * (size - 1) + b"\n") for i in range(n)]


class BuilderTests(SynchronousTestCase):
    def test_due_by_age_from_the_first_item(self) -> None:
        b = BatchBuilder(max_bytes=10**6, max_age=30)
        self.assertFalse(b.due(1000))  # empty: never due
        b.add(Item(b"1-0", EV), now=100)
        b.add(Item(b"1-1", EV), now=125)
        self.assertFalse(b.due(129.9))
        self.assertTrue(b.due(130))

    def test_full_by_estimated_size(self) -> None:
        one = estimate_line_size(EV)
        b = BatchBuilder(max_bytes=3 * one, max_age=30)
        b.add(Item(b"1-0", EV), 0)
        b.add(Item(b"1-1", EV), 0)
        self.assertFalse(b.full)
        b.add(Item(b"1-2", EV), 0)
        self.assertTrue(b.full)
        self.assertTrue(b.due(0))

    def test_estimate_is_not_below_a_real_line(self) -> None:
        ua = UserAgentInfo("Chrome", "Windows", "Other", is_mobile=False)
        line = ndjson_line(sparkpost_event("1700000000000-0", EV, ua=ua, geo=None,
                                           enrichment=None))
        self.assertGreaterEqual(estimate_line_size(EV), len(line))

    def test_put_back_goes_first_and_keeps_the_older_start(self) -> None:
        b = BatchBuilder(max_bytes=10**6, max_age=30)
        b.add(Item(b"2-0", EV), now=50)
        b.put_back(built(2, 100), started_at=10)
        items, started = b.take()
        self.assertEqual([i.entry_id for i in items], [b"1-0", b"1-1", b"2-0"])
        self.assertEqual(started, 10)
        self.assertEqual(len(b), 0)
        self.assertFalse(b.due(10**9))


class PackTests(SynchronousTestCase):
    def test_cut_at_the_limit(self) -> None:
        fit, rest = pack(built(10, 100), 350)
        self.assertEqual(len(fit), 3)
        self.assertEqual([i.entry_id for i in rest], [f"1-{i}".encode() for i in range(3, 10)])

    def test_exactly_at_the_limit_fits(self) -> None:
        fit, rest = pack(built(4, 100), 400)
        self.assertEqual((len(fit), rest), (4, []))

    def test_an_oversized_line_goes_alone(self) -> None:
        fit, rest = pack(built(3, 500), 400)
        self.assertEqual((len(fit), len(rest)), (1, 2))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 300), max_size=60), st.integers(50, 2000))
    def test_never_over_the_limit_nothing_lost(self, sizes: list[int], limit: int) -> None:
        items = [Item(f"1-{i}".encode(), EV, b"x" * s) for i, s in enumerate(sizes)]
        fit, rest = pack(items, limit)
        self.assertEqual(fit + rest, items)
        total = sum(len(i.line or b"") for i in fit)
        self.assertTrue(total <= limit or len(fit) == 1)
        if rest:
            self.assertGreater(total + len(rest[0].line or b""), limit)


