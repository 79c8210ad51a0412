# -*- test-case-name: tests.test_smtp -*-
"""The wrapper's Prometheus series, created once per service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from sparkytwist.metrics import Metrics
from sparkytwist.rewrite import RewriteResult

#: Every ``outcome`` a message can have (docs/monitoring.md explains each).
OUTCOMES = ("relayed", "refused", "too_big", "too_big_declared", "line_too_long",
            "upstream_lost", "upstream_timeout", "partial", "copy_refused", "client_lost",
            "client_timeout")


class WrapperStats:
    """Counters the proxy bumps; ``outcome`` labels are a fixed small set."""

    def __init__(self, metrics: Metrics) -> None:
        c = metrics.counter
        self.connections: Counter = c("wrapper_connections", "client connections accepted")
        self.refused: Counter = c(
            "wrapper_connections_refused", "client connections refused", ["reason"])
        self.active: Gauge = metrics.gauge("wrapper_connections_active", "open client connections")
        self.messages: Counter = c(
            "wrapper_messages", "messages by outcome (relayed or why not)", ["outcome"])
        for outcome in OUTCOMES:
            self.messages.labels(outcome)  # at 0 from the start: see metrics.py
        self.copies: Counter = c("wrapper_copies", "copies relayed upstream and accepted")
        self.links: Counter = c("wrapper_links_rewritten", "links now going through the tracker")
        self.pixels: Counter = c("wrapper_pixels", "open pixels inserted")
        self.parts_rewritten: Counter = c("wrapper_parts_rewritten", "HTML parts tracked")
        self.parts_skipped: Counter = c(
            "wrapper_parts_skipped", "HTML parts relayed untracked (undecodable etc.)")
        self.problems: Counter = c(
            "wrapper_rewrite_problems", "problems met while rewriting", ["problem"])
        self.bytes_in: Counter = c("wrapper_bytes_received", "message bytes received")
        self.bytes_out: Counter = c("wrapper_bytes_relayed", "message bytes relayed upstream")
        self.tls_fallbacks: Counter = c(
            "wrapper_upstream_tls_fallbacks",
            "opportunistic STARTTLS to the upstream failed: went on in clear")
        self.discarded: Counter = c(
            "wrapper_starttls_discarded", "connections that pipelined input after STARTTLS")

    def rewritten(self, result: RewriteResult) -> None:
        if result.links:
            self.links.inc(result.links)
        if result.pixels:
            self.pixels.inc(result.pixels)
        if result.parts_rewritten:
            self.parts_rewritten.inc(result.parts_rewritten)
        if result.parts_skipped:
            self.parts_skipped.inc(result.parts_skipped)
        for problem in result.problems:
            self.problems.labels(problem).inc()

    def outcome(self, outcome: str) -> None:
        self.messages.labels(outcome).inc()
