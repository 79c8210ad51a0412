# -*- test-case-name: tests.test_accounting -*-
"""Bytes → parser → writer, pausing whatever produces the bytes when the writer asks.

One reader serves every way in (stdin, a file, a spawned command): the source
attaches its producer (a transport, or our file reader) and feeds the bytes. When
the writer wants a pause (Redis down, too many records waiting) the producer is
paused: nothing more is read, so the pipe fills and PowerMTA waits. A producer
attached while paused (a restarted command) is paused at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger

from sparkytwist.accounting.stats import Stats
from sparkytwist.accounting.writer import DeliveryWriter
from sparkytwist.acctcsv import (
    OTHER_TYPE,
    RECORD_TYPES,
    AccountingParser,
    DeliveryFacts,
    Record,
    delivery_facts,
    skip_reason,
)
from sparkytwist.ratelog import RateLimitedLog

_log = Logger()

#: The malformed reason counted for data lines that come before any header.
BEFORE_HEADER = "before-header"


class AccountingReader:
    """Parses chunks of accounting CSV and hands the delivery facts to the writer."""

    def __init__(
        self,
        writer: DeliveryWriter,
        stats: Stats,
        clock: IReactorTime,
        *,
        parser: AccountingParser | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self.writer = writer
        self.stats = stats
        self.parser = parser or AccountingParser()
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self._malformed_log = RateLimitedLog(_log, clock, log_interval)
        self._header_log = RateLimitedLog(_log, clock, log_interval)
        # What the parser counted at the last sync, to turn its totals into deltas.
        self._seen_records = 0
        self._seen_by_type: dict[str, int] = {}
        self._seen_malformed: dict[str, int] = {}
        self._seen_before_header = 0
        writer.set_flow(self._pause, self._resume)

    # -- the producer -------------------------------------------------------------

    def attach(self, producer: IPushProducer) -> None:
        """Read from this producer from now on (paused at once if we are paused)."""
        self._producer = producer
        self._producer_paused = False
        if self.writer.paused:
            self._pause()

    def detach(self) -> None:
        self._producer = None
        self._producer_paused = False

    def stop_input(self) -> None:
        """Read nothing more (shutting down): pause the producer and let go of it."""
        if self._producer is not None and not self._producer_paused:
            self._producer.pauseProducing()
        self.detach()

    def _pause(self) -> None:
        if self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def _resume(self) -> None:
        if self._producer is not None and self._producer_paused:
            self._producer_paused = False
            self._producer.resumeProducing()

    # -- the bytes ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._handle(self.parser.feed(data))

    def finish(self) -> None:
        """End of this input: the last record even without its line end, then flush.

        The parser (and its header) is kept: a restarted ``tail -F -n0`` sends no
        header again.
        """
        self._handle(self.parser.finish())
        self.writer.flush()

    def _handle(self, records: Sequence[Record]) -> None:
        facts: list[DeliveryFacts] = []
        skipped_type: dict[str, int] = {}
        skipped_reason: dict[str, int] = {}
        for record in records:
            f = delivery_facts(record)
            if f is not None:
                facts.append(f)
                continue
            kind = record.type if record.type in RECORD_TYPES else OTHER_TYPE
            skipped_type[kind] = skipped_type.get(kind, 0) + 1
            reason = str(skip_reason(record))
            skipped_reason[reason] = skipped_reason.get(reason, 0) + 1
        if facts:
            self.writer.write(facts)
        self._sync(skipped_type, skipped_reason)

    def _sync(self, skipped_type: dict[str, int], skipped_reason: dict[str, int]) -> None:
        c = self.parser.counts
        read: dict[str, int] = {}
        if c.records != self._seen_records:
            self._seen_records = c.records
            read = _delta(c.by_type, self._seen_by_type)
        malformed: dict[str, int] = {}
        if sum(self._seen_malformed.values()) != c.malformed:
            malformed = _delta(c.malformed_by_reason, self._seen_malformed)
            self._malformed_log.warn(
                "accounting: malformed line dropped ({problem}); {count} since the last "
                "report, {total} in all", events=sum(malformed.values()),
                problem=self.parser.last_problem, total=c.malformed)
        if c.before_header != self._seen_before_header:
            n = c.before_header - self._seen_before_header
            self._seen_before_header = c.before_header
            malformed[BEFORE_HEADER] = n
            self._header_log.warn(
                "accounting: data line before any header line dropped (the stream must "
                "start with PMTA's 'type,...' header); {count} since the last report, "
                "{total} in all", events=n, total=c.before_header)
        if read or skipped_type or malformed:
            self.stats.parsed(read, skipped_type, skipped_reason, malformed)


def _delta(now: dict[str, int], seen: dict[str, int]) -> dict[str, int]:
    """now minus seen for each key, and remember now in seen."""
    out = {}
    for key, n in now.items():
        d = n - seen.get(key, 0)
        if d:
            out[key] = d
            seen[key] = n
    return out
