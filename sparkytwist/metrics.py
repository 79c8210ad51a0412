# -*- test-case-name: tests.test_admin -*-
"""Prometheus metrics for one running service, in a registry of its own.

Not prometheus-client's global registry: each service (and each test) gets a
fresh :class:`Metrics`, so nothing leaks between them and parts register their own
series when they are built. Parts create the children of every label value they
know of up front (``counter.labels(value)``): a series that first appears at its
first increment hides that increment from ``rate()`` and from alerts.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

NAMESPACE = "sparkytwist"


class Metrics:
    """The registry plus get-or-create helpers, so two parts can share a series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        if name not in self._counters:
            self._counters[name] = Counter(
                name, documentation, labelnames=labels, namespace=NAMESPACE,
                registry=self.registry)
        return self._counters[name]

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        if name not in self._gauges:
            self._gauges[name] = Gauge(
                name, documentation, labelnames=labels, namespace=NAMESPACE,
                registry=self.registry)
        return self._gauges[name]

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)
