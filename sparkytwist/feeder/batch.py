# -*- test-case-name: tests.test_feeder_batch -*-
"""Batching, without I/O: when a batch is complete, and what goes into the request.

Entries are read before their SparkPost line exists (the line needs the delivery
facts, looked up once per batch), so "full" is judged on an estimate of each line's
size; :func:`pack` then cuts the built lines at the real byte limit and hands the
rest back for the next batch. The limit is therefore never exceeded, and a batch
is at worst a little smaller than it could have been.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sparkytwist.trackevent import TrackEvent

#: JSON names, user_agent_parsed and the constant fields of a line, in bytes.
LINE_OVERHEAD = 330
#: Room kept for the delivery facts (campaign, friendly_from, IP, pool, domain).
ENRICHMENT_RESERVE = 160


def estimate_line_size(event: TrackEvent) -> int:
    """Roughly what ``ndjson_line`` will make of this hit (exact size is known later)."""
    return (
        LINE_OVERHEAD
        + ENRICHMENT_RESERVE
        + len(event.message_id)
        + 2 * len(event.rcpt)  # rcpt_to and raw_rcpt_to
        + len(event.ip)
        + len(event.user_agent)
        + len(event.url)
    )


@dataclass(slots=True)
class Item:
    """One stream entry on its way into a batch; ``line`` is set once it is built."""

    entry_id: bytes
    event: TrackEvent
    line: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.line) if self.line is not None else estimate_line_size(self.event)


class BatchBuilder:
    """Collects items until ``max_bytes`` (estimated) or ``max_age`` seconds is reached.

    The age counts from the moment the oldest item still waiting was added: a
    trickle of events is sent ``max_age`` after its first one, never held longer.
    """

    def __init__(self, max_bytes: int, max_age: float) -> None:
        if max_bytes <= 0 or max_age < 0:
            raise ValueError("max_bytes must be > 0 and max_age >= 0")
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._items: list[Item] = []
        self._bytes = 0
        self.started_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        return self._bytes

    @property
    def full(self) -> bool:
        return self._bytes >= self.max_bytes

    def due(self, now: float) -> bool:
        """Full, or non-empty and old enough to go."""
        if not self._items:
            return False
        assert self.started_at is not None
        return self.full or now - self.started_at >= self.max_age

    def add(self, item: Item, now: float) -> None:
        if self.started_at is None:
            self.started_at = now
        self._items.append(item)
        self._bytes += item.size

    def put_back(self, items: Sequence[Item], started_at: float) -> None:
        """Return what did not fit in the last batch; it goes first in the next one."""
        if not items:
            return
        self._items[:0] = items
        self._bytes += sum(item.size for item in items)
        self.started_at = started_at if self.started_at is None else min(
            started_at, self.started_at)

    def take(self) -> tuple[list[Item], float]:
        """Everything collected, and when the oldest of it was added."""
        items, self._items = self._items, []
        started = self.started_at if self.started_at is not None else 0.0
        self._bytes = 0
        self.started_at = None
        return items, started


def pack(items: Sequence[Item], max_bytes: int) -> tuple[list[Item], list[Item]]:
    """Split built items into (what fits in ``max_bytes``, the rest), keeping order.

    A single line larger than the limit still goes alone, so nothing is stuck forever
    (the tracker's URL and UA limits keep real lines far below any sane limit).
    """
    total = 0
    for n, item in enumerate(items):
        assert item.line is not None, "pack() needs built lines"
        total += len(item.line)
        if total > max_bytes:
            cut = max(n, 1)
            return list(items[:cut]), list(items[cut:])
    return list(items), []
