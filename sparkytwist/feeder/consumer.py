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

# XREADGROUP replies are parsed by hiredis in C and left as they are (``RawReplyProtocol``
# in sparkytwist.redis): turning the entries into dicts costs ~1.5 µs each, and Redis
# spends a quarter of what a Lua script re-encoding them as JSON would.
#
# XAUTOCLAIM goes through a Lua script that answers with ONE JSON string (cjson).

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

# Many ids or keys go to Redis as ONE argument, each ended by a NUL, that a script
# splits: txredisapi builds every argument in Python (~1.5 µs each), Redis splits
# a string in a fraction of that. A value holding a NUL takes the plain command.
_SEP = b"\0"

#: Lua: the NUL-ended items of a string, as a table.
_SPLIT = """
local function split(data)
  local items, pos = {}, 1
  while pos <= #data do
    local e = string.find(data, '\\0', pos, true)
    items[#items + 1] = string.sub(data, pos, e - 1)
    pos = e + 1
  end
  return items
end
"""

#: XACK of the ids in ARGV[2], a thousand per call (Lua's unpack has a limit).
_ACK = Script(
    _SPLIT + """
local ids, n = split(ARGV[2]), 0
for i = 1, #ids, 1000 do
  n = n + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 999, #ids)))
end
return n
"""
)

#: The fields ARGV[2..] of each hash named in ARGV[1] (false where missing), as JSON.
_HMGET_JOINED = Script(
    _SPLIT + """
local fields, out = {unpack(ARGV, 2)}, {}
for i, key in ipairs(split(ARGV[1])) do out[i] = redis.call('HMGET', key, unpack(fields)) end
return cjson.encode(out)
"""
)

#: The same with the hashes as KEYS: for key names that hold a NUL.
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


def _read_entries(reply: list[Any] | None) -> list[Entry]:
    """Entries from an XREADGROUP reply (fields None: trimmed while pending). Bytes
    that are not UTF-8 (a raw user agent) survive as lone surrogates, which
    ndjson_line turns into U+FFFD."""
    if not reply:
        return []
    out: list[Entry] = []
    for entry_id, flat in reply[0][1]:
        if flat:
            it = iter(flat)
            out.append((entry_id, {
                k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
                for k, v in zip(it, it, strict=True)}))
        else:
            out.append((entry_id, None))
    return out


def _joined(items: Sequence[bytes]) -> bytes | None:
    """The items, each ended by a NUL, as one argument; None if one holds a NUL."""
    data = _SEP.join(items)
    return data + _SEP if data.count(_SEP) == len(items) - 1 else None


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
        return await self._read(count, b">")

    async def read_own_pending(self, after: bytes, count: int) -> list[Entry]:
        """Our own pending entries with an id above ``after`` (start with b"0")."""
        return await self._read(count, after)

    async def _read(self, count: int, start: bytes) -> list[Entry]:
        return _read_entries(await self.redis.execute(
            "XREADGROUP", "GROUP", self.group, self.name, "COUNT", count,
            "STREAMS", self.stream, start))

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
            chunk = ids[start:start + 10_000]
            data = _joined(chunk)
            if data is not None:
                acked += int(await _ACK(self.redis, [self.stream], [self.group, data]))
            else:
                acked += int(await self.redis.execute("XACK", self.stream, self.group, *chunk))
        return acked

    async def delivery_facts(
        self, keys: Sequence[bytes], fields: Sequence[str]
    ) -> list[list[str | bool]]:
        """The named fields of each hash (False where missing), in one round trip.

        False rather than None: the rows come straight from json.loads, unchanged
        (turning each into a list of str | None cost more than the lookup itself).
        """
        if not keys:
            return []
        data = _joined(keys)
        if data is not None:
            reply = await _HMGET_JOINED(self.redis, [], [data, *fields])
        else:
            reply = await _HMGET_MANY(self.redis, list(keys), list(fields))
        rows: list[list[str | bool]] = json.loads(reply.decode("utf-8", "surrogateescape"))
        return rows

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
