# -*- test-case-name: tests.test_erase -*-
"""Erasing one recipient from Redis: delivery facts, queued events, dead letters.

For erasure requests (GDPR art. 17 and the like). SparkPost keeps what it already
received under its own retention; this removes what is still here.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass

from sparkytwist.redis import Redis
from sparkytwist.store import Keys

#: Entries read per XRANGE while scanning a stream.
CHUNK = 1000
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass
class Erased:
    delivery_facts: int = 0
    events: int = 0
    dead_letters: int = 0


async def erase_recipient(redis: Redis, keys: Keys, rcpt: str) -> Erased:
    """Delete everything stored about ``rcpt`` (compared case-insensitively)."""
    rcpt = rcpt.strip().lower()
    erased = Erased()
    pattern = keys.delivery("*", "").decode() + _GLOB_SPECIAL.sub(r"\\\1", rcpt)
    cursor = b"0"
    while True:
        cursor, found = await redis.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        if found:
            erased.delivery_facts += int(await redis.execute("DEL", *found))
        if cursor in (b"0", 0):
            break
    needle = rcpt.encode()
    erased.events = await _xdel_matching(
        redis, keys.events, lambda f: f.get(b"rcpt", b"").lower() == needle)
    erased.dead_letters = await _xdel_matching(
        redis, keys.dead_letters, lambda f: _batch_mentions(f.get(b"batch", b""), needle))
    return erased


async def _xdel_matching(redis: Redis, stream: bytes, matches: object) -> int:
    assert callable(matches)
    deleted, start = 0, b"-"
    while True:
        entries = await redis.execute("XRANGE", stream, start, "+", "COUNT", CHUNK)
        if not entries:
            return deleted
        doomed = []
        for entry_id, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            if matches(fields):
                doomed.append(entry_id)
        if doomed:
            deleted += int(await redis.execute("XDEL", stream, *doomed))
        start = b"(" + entries[-1][0]
        if len(entries) < CHUNK:
            return deleted


def _batch_mentions(body: bytes, needle: bytes) -> bool:
    """Whether a dead-lettered (gzipped NDJSON) batch holds the recipient."""
    try:
        text = gzip.decompress(body)
    except (OSError, EOFError, zlib.error):
        text = body
    return b'"rcpt_to":"' + needle + b'"' in text.lower().replace(b'": "', b'":"')
