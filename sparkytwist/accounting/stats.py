# -*- test-case-name: tests.test_accounting -*-
"""What the accounting reader did: plain counts for the log, Prometheus series if bound.

``twistd etl`` has no admin port, so its counts only go to the log (progress and
summary lines); inside ``twistd sparkytrack`` the same counts are also exported.
Counts arrive in bulk (per chunk read, per batch written), never per record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparkytwist.acctcsv import OTHER_TYPE, RECORD_TYPES, Problem, SkipReason
from sparkytwist.metrics import Metrics


def _add(into: dict[str, int], delta: Mapping[str, int]) -> None:
    for key, n in delta.items():
        into[key] = into.get(key, 0) + n


def _fmt(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


class Stats:
    """Counts of one reader; mirrored into ``metrics`` when given."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.read_by_type: dict[str, int] = {}
        self.skipped_by_type: dict[str, int] = {}
        self.skipped_by_reason: dict[str, int] = {}
        self.malformed_by_reason: dict[str, int] = {}
        self.stored = 0
        self.rejected = 0
        self.batches = 0
        self.write_failures = 0
        self.paused_seconds = 0.0
        self.restarts = 0
        self._m: dict[str, Any] | None = None
        if metrics is not None:
            self._m = {
                "read": metrics.counter(
                    "acct_records", "accounting records read, by record type", ["type"]),
                "stored": metrics.counter(
                    "acct_stored", "delivery facts written to Redis"),
                "rejected": metrics.counter(
                    "acct_rejected", "delivery facts Redis refused (key of another type)"),
                "skipped": metrics.counter(
                    "acct_skipped", "records that give no delivery facts, by reason",
                    ["reason"]),
                "malformed": metrics.counter(
                    "acct_malformed", "lines dropped as malformed, by reason", ["reason"]),
                "batches": metrics.counter(
                    "acct_batches", "batches written to Redis (one script call each)"),
                "failures": metrics.counter(
                    "acct_write_failures", "failed batch writes (each is retried)"),
                "paused": metrics.counter(
                    "acct_paused_seconds", "seconds reading was paused (Redis down or busy)"),
                "restarts": metrics.counter(
                    "acct_command_restarts", "restarts of accounting_command"),
                "pending": metrics.gauge(
                    "acct_pending", "records read and not yet written"),
                "is_paused": metrics.gauge(
                    "acct_input_paused", "1 while reading is paused"),
            }
            # Every known label value at 0 from the start: see metrics.py.
            for kind in (*sorted(RECORD_TYPES), OTHER_TYPE):
                self._m["read"].labels(kind)
            for reason in SkipReason:
                self._m["skipped"].labels(str(reason))
            for problem in Problem:
                self._m["malformed"].labels(str(problem))

    @property
    def read(self) -> int:
        return sum(self.read_by_type.values())

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_type.values())

    @property
    def malformed(self) -> int:
        return sum(self.malformed_by_reason.values())

    def parsed(
        self,
        read_by_type: Mapping[str, int],
        skipped_by_type: Mapping[str, int],
        skipped_by_reason: Mapping[str, int],
        malformed_by_reason: Mapping[str, int],
    ) -> None:
        """Deltas from one chunk of input."""
        _add(self.read_by_type, read_by_type)
        _add(self.skipped_by_type, skipped_by_type)
        _add(self.skipped_by_reason, skipped_by_reason)
        _add(self.malformed_by_reason, malformed_by_reason)
        if self._m is not None:
            for key, n in read_by_type.items():
                self._m["read"].labels(key).inc(n)
            for key, n in skipped_by_reason.items():
                self._m["skipped"].labels(key).inc(n)
            for key, n in malformed_by_reason.items():
                self._m["malformed"].labels(key).inc(n)

    def batch_written(self, stored: int, rejected: int) -> None:
        self.batches += 1
        self.stored += stored
        self.rejected += rejected
        if self._m is not None:
            self._m["batches"].inc()
            self._m["stored"].inc(stored)
            if rejected:
                self._m["rejected"].inc(rejected)

    def write_failed(self) -> None:
        self.write_failures += 1
        if self._m is not None:
            self._m["failures"].inc()

    def pause_changed(self, paused: bool, seconds: float = 0.0) -> None:
        self.paused_seconds += seconds
        if self._m is not None:
            self._m["is_paused"].set(1 if paused else 0)
            if seconds:
                self._m["paused"].inc(seconds)

    def pending(self, n: int) -> None:
        if self._m is not None:
            self._m["pending"].set(n)

    def restarted(self) -> None:
        self.restarts += 1
        if self._m is not None:
            self._m["restarts"].inc()

    def summary(self) -> str:
        """One line, no field values (they hold addresses)."""
        return (
            f"{self.read} records read ({_fmt(self.read_by_type)}), {self.stored} stored, "
            f"{self.skipped} skipped (by type: {_fmt(self.skipped_by_type)}; by reason: "
            f"{_fmt(self.skipped_by_reason)}), {self.malformed} malformed "
            f"({_fmt(self.malformed_by_reason)}), {self.rejected} refused by Redis, "
            f"{self.batches} batches, {self.write_failures} failed writes, "
            f"paused {self.paused_seconds:.1f}s"
        )
