# -*- test-case-name: tests.test_feeder -*-
"""The feeder's Prometheus series, created once per feeder (known label values at 0)."""

from __future__ import annotations

from sparkytwist.metrics import Metrics


class FeederStats:
    """Counters and gauges the feeder bumps, bound to its sink's label."""

    def __init__(self, metrics: Metrics, sink: str) -> None:
        self.sent = metrics.counter(
            "feeder_events_sent", "Events accepted by the sink", ["sink"]).labels(sink)
        self._batches = metrics.counter(
            "feeder_batches", "Upload attempts by outcome (HTTP status, or error)",
            ["sink", "status"])
        self.sink = sink
        self.retries = metrics.counter(
            "feeder_retries", "Upload attempts that will be retried", ["sink"]).labels(sink)
        self.dead_batches = metrics.counter(
            "feeder_dead_lettered_batches", "Batches refused for good, kept in the "
            "dead-letter stream", ["sink"]).labels(sink)
        self.dead_events = metrics.counter(
            "feeder_dead_lettered_events", "Events in dead-lettered batches",
            ["sink"]).labels(sink)
        self._dropped = metrics.counter(
            "feeder_dropped_events", "Entries acknowledged without being sent: too_old "
            "(beyond Ingest's 24 h), trimmed (cut by the stream cap while pending), "
            "malformed", ["reason"])
        for reason in ("too_old", "trimmed", "malformed"):
            self._dropped.labels(reason)  # at 0 from the start: see metrics.py
        self.claimed = metrics.counter(
            "feeder_claimed_entries", "Entries taken over from an idle consumer")
        self.raw_bytes = metrics.counter(
            "feeder_raw_bytes", "Uncompressed NDJSON bytes accepted by the sink")
        self.gzip_bytes = metrics.counter(
            "feeder_gzip_bytes", "Compressed bytes accepted by the sink")
        self.lag = metrics.gauge(
            "feeder_lag_entries", "Events in the stream not yet acknowledged by the "
            "feeders: pending plus unread (on Redis 6.2 unread counts up to 10000)")
        self.lag_seconds = metrics.gauge(
            "feeder_lag_seconds", "Age of the oldest event not yet acknowledged")
        self.paused = metrics.gauge(
            "feeder_paused", "1 while the feeder waits after the sink refused the key")

    def batch(self, status: int | str) -> None:
        self._batches.labels(self.sink, str(status)).inc()

    def dropped(self, reason: str, n: int) -> None:
        if n:
            self._dropped.labels(reason).inc(n)
