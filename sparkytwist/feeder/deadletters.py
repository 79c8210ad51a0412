# -*- test-case-name: tests.test_deadletters -*-
"""Batches the sink refused for good: list them, and send them again once fixed.

A revoked key (401) dead-letters the batch in flight before the feeder pauses; once
the key is fixed, ``sparkytwist dead-letters resend`` delivers it. Each entry keeps
the gzip body exactly as it was sent, so the event ids are the same and a batch
that did arrive after all is not counted twice by SparkPost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from sparkytwist.feeder.sinks import Delivered, EncodedBatch, Sink
from sparkytwist.redis import Redis
from sparkytwist.store import Keys

CHUNK = 100


@dataclass(frozen=True)
class DeadLetter:
    entry_id: bytes
    reason: str
    events: int
    at: int
    batch: EncodedBatch


async def dead_letters(redis: Redis, keys: Keys) -> AsyncIterator[DeadLetter]:
    """Every dead-lettered batch, oldest first."""
    start = b"-"
    while True:
        entries = await redis.execute("XRANGE", keys.dead_letters, start, "+", "COUNT", CHUNK)
        for entry_id, flat in entries:
            f = dict(zip(flat[::2], flat[1::2], strict=True))
            body = f.get(b"batch", b"")
            events = int(f.get(b"events", b"0") or 0)
            yield DeadLetter(
                entry_id=entry_id, reason=f.get(b"reason", b"").decode(errors="replace"),
                events=events, at=int(f.get(b"at", b"0") or 0),
                batch=EncodedBatch(body, 0, events, f.get(b"first_id", b""),
                                   f.get(b"last_id", b"")))
        if len(entries) < CHUNK:
            return
        start = b"(" + entries[-1][0]


async def resend(redis: Redis, keys: Keys, sink: Sink) -> tuple[int, str | None]:
    """Send every dead letter again, deleting each one the sink accepted.

    Stops at the first batch the sink does not accept: (batches sent, why it stopped).
    """
    sent = 0
    async for letter in dead_letters(redis, keys):
        outcome = await sink.deliver(letter.batch)
        if not isinstance(outcome, Delivered):
            return sent, f"{letter.entry_id.decode()}: {outcome}"
        await redis.execute("XDEL", keys.dead_letters, letter.entry_id)
        sent += 1
    return sent, None
