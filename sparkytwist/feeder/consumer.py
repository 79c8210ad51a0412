# -*- test-case-name: tests.test_feeder -*-
"""The events stream as seen by one feeder in the consumer group.

Every call is one round trip. Entries come back as ``(id, fields)``; ``fields`` is
None when the entry was trimmed away (MAXLEN) while still pending: such an entry
cannot be sent, only acknowledged. Redis 6.2 is the minimum (XAUTOCLAIM, exclusive
XRANGE ranges); nothing here relies on 7.x-only replies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sparkytwist.redis import Redis, Script
from sparkytwist.store import Keys

Fields = dict[str, str]
Entry = tuple[bytes, Fields | None]

# Stream reads go through Lua scripts that answer with ONE JSON string (cjson)
# instead of a nested reply: txredisapi walks every element of a reply in Python
# (~1 µs each, ~16 per entry), while json.loads parses the whole string in C.
# Redis allows non-blocking XREADGROUP / XAUTOCLAIM in scripts (6.2 and 7.x).

_READGROUP = Script(
    """
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], ARGV[4])
if not r or #r[1][2] == 0 then return '[]' end
return cjson.encode(r[1][2])
"""
)

#: XAUTOCLAIM with JUSTID, then each claimed entry's fields (false when trimmed).
#: Redis 6.2 answers a plain XAUTOCLAIM with a bare nil for a trimmed entry, so its
#: id would be lost and it could never be acknowledged; JUSTID keeps every id.
_AUTOCLAIM = Script(
    """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     'COUNT', ARGV[5], 'JUSTID')
local out = {}
for i, id in ipairs(r[2]) do
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e > 0 then out[i] = {id, e[1][2]} else out[i] = {id, false} end
end
if #out == 0 then return {r[1], '[]'} end
return {r[1], cjson.encode(out)}
"""
)

#: The named fields of many hashes (false where missing), as one JSON string.
_HMGET_MANY = Script(
    """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end
return cjson.encode(out)
"""
)

#: Entries after the group's last-delivered id, counted up to a cap, and the first one.
_UNREAD = Script(
    """
local cap = tonumber(ARGV[2])
local n, start, first = 0, '(' .. ARGV[1], false
while n < cap do
  local r = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  if #r == 0 then break end
  if not first then first = r[1][1] end
  n = n + #r
  if #r < 1000 then break end
  start = '(' .. r[#r][1]
end
return {n, first}
"""
)

#: Where counting unread entries stops on Redis 6.2 (Redis 7 reports the lag itself).
UNREAD_COUNT_CAP = 10_000


def _pairs(flat: Sequence[Any] | None) -> dict[Any, Any] | None:
    if flat is None:
        return None
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def _decode_entries(reply: bytes) -> list[Entry]:
    """Entries from a script's JSON reply; bytes that are not UTF-8 (a raw user agent)
    survive as lone surrogates, which ndjson_line turns into U+FFFD."""
    raw = json.loads(reply.decode("utf-8", "surrogateescape"))
    out: list[Entry] = []
    for entry_id, flat in raw:
        out.append((entry_id.encode(), _pairs(flat) if flat else None))
    return out


def stream_id_ms(entry_id: bytes) -> int:
    return int(entry_id.partition(b"-")[0])


class StreamConsumer:
    """One consumer (``name``) of ``group`` on the events stream."""

    def __init__(self, redis: Redis, keys: Keys, group: bytes, name: str) -> None:
        self.redis = redis
        self.keys = keys
        self.stream = keys.events
        self.group = group
        self.name = name

    async def ensure_group(self) -> bool:
        """Create the group at id 0 (and the stream) if missing; True if created."""
        try:
            await self.redis.execute("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM")
        except Exception as e:
            if "BUSYGROUP" in str(e):
                return False
            raise
        return True

    async def read_new(self, count: int) -> list[Entry]:
        """Entries never delivered to the group; they become pending for us."""
        return _decode_entries(await _READGROUP(
            self.redis, [self.stream], [self.group, self.name, count, ">"]))

    async def read_own_pending(self, after: bytes, count: int) -> list[Entry]:
        """Our own pending entries with an id above ``after`` (start with b"0")."""
        return _decode_entries(await _READGROUP(
            self.redis, [self.stream], [self.group, self.name, count, after]))

    async def autoclaim(
        self, min_idle: float, cursor: bytes, count: int
    ) -> tuple[bytes, list[Entry]]:
        """Take over entries idle for ``min_idle`` seconds (a dead feeder's batch)."""
        reply = await _AUTOCLAIM(
            self.redis, [self.stream],
            [self.group, self.name, int(min_idle * 1000), cursor, count])
        return reply[0], _decode_entries(reply[1])

    async def touch(self, ids: Sequence[bytes]) -> None:
        """Reset the idle time of entries we still hold, so nobody claims them."""
        for start in range(0, len(ids), 5000):
            await self.redis.execute(
                "XCLAIM", self.stream, self.group, self.name, 0,
                *ids[start:start + 5000], "JUSTID")

    async def ack(self, ids: Sequence[bytes]) -> int:
        acked = 0
        for start in range(0, len(ids), 10_000):
            acked += int(await self.redis.execute(
                "XACK", self.stream, self.group, *ids[start:start + 10_000]))
        return acked

    async def delivery_facts(
        self, keys: Sequence[bytes], fields: Sequence[str]
    ) -> list[list[str | None]]:
        """The named fields of each hash (None where missing), in one round trip."""
        if not keys:
            return []
        reply = await _HMGET_MANY(self.redis, list(keys), list(fields))
        rows = json.loads(reply.decode("utf-8", "surrogateescape"))
        return [[v if isinstance(v, str) else None for v in row] for row in rows]

    async def dead_letter(self, fields: dict[str, bytes | str | int], maxlen: int) -> bytes:
        flat: list[bytes | str | int] = []
        for name, value in fields.items():
            flat += [name, value]
        entry_id: bytes = await self.redis.execute(
            "XADD", self.keys.dead_letters, "MAXLEN", "~", maxlen, "*", *flat)
        return entry_id

    async def lag(self, now_ms: int) -> tuple[int, float] | None:
        """(entries pending + unread, seconds behind) for the group; None without it.

        Redis 7 reports unread entries as ``lag`` in XINFO GROUPS; 6.2 has no such
        count, so a script counts entries after last-delivered-id, stopping at
        UNREAD_COUNT_CAP. Seconds behind is exact on both: the age of the oldest
        entry not yet acknowledged (oldest pending, else first unread).
        """
        try:
            groups = await self.redis.execute("XINFO", "GROUPS", self.stream)
        except Exception as e:
            if "no such key" in str(e).lower():
                return None
            raise
        info: dict[bytes, Any] | None = None
        for flat in groups:
            candidate = _pairs(flat) or {}
            if candidate.get(b"name") == self.group:
                info = candidate
        if info is None:
            return None
        pending = int(info[b"pending"])
        last = info[b"last-delivered-id"]
        oldest: bytes | None = None
        if pending:
            summary = await self.redis.execute("XPENDING", self.stream, self.group)
            oldest = summary[1]
        unread_first: bytes | None = None
        lag_7 = info.get(b"lag")  # Redis >= 7; nil there when it cannot tell
        if lag_7 is not None:
            unread = int(lag_7)
            if not pending:
                first = await self.redis.execute(
                    "XRANGE", self.stream, b"(" + last, "+", "COUNT", 1)
                unread_first = first[0][0] if first else None
        else:
            counted = await _UNREAD(self.redis, [self.stream], [last, UNREAD_COUNT_CAP])
            unread, unread_first = int(counted[0]), counted[1]
        # Pending ids are all <= last-delivered-id < unread ids: the oldest pending
        # entry, if any, is the oldest one not yet delivered.
        behind_from = oldest or unread_first
        seconds = max(0.0, (now_ms - stream_id_ms(behind_from)) / 1000) if behind_from else 0.0
        return pending + unread, seconds
