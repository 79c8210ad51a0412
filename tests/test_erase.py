"""Erasing a recipient: what an operator runs for an erasure request."""

from __future__ import annotations

import gzip
import subprocess

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from sparkytwist.erase import erase_recipient
from sparkytwist.redis import Redis
from sparkytwist.store import Keys
from tests.support.processes import venv_script
from tests.support.redis import fresh_redis, shared_server

KEYS = Keys()


class EraseTests(TestCase):
    async def fill(self) -> Redis:
        redis = await fresh_redis(self)
        for msg in ("0123456789abcdef0001", "0123456789abcdef0002"):
            await redis.execute("HSET", KEYS.delivery(msg, "Fred@Example.com"), "ip_pool", "a")
            await redis.execute("HSET", KEYS.delivery(msg, "anne@example.com"), "ip_pool", "a")
        await redis.execute("HSET", KEYS.delivery("0123456789abcdef0003", "f*d@example.com"),
                            "ip_pool", "a")
        for rcpt in ("Fred@Example.com", "anne@example.com", "fred@example.com"):
            await redis.execute("XADD", KEYS.events, "*", "type", "open", "rcpt", rcpt)
        for rcpt in ("fred@example.com", "anne@example.com"):
            body = gzip.compress(b'{"msys":{"track_event":{"rcpt_to":"%s"}}}\n' % rcpt.encode())
            await redis.execute("XADD", KEYS.dead_letters, "*", "status", "400", "batch", body)
        return redis

    async def test_erases_only_that_recipient(self) -> None:
        redis = await self.fill()
        erased = await erase_recipient(redis, KEYS, "FRED@example.com")
        self.assertEqual((erased.delivery_facts, erased.events, erased.dead_letters), (2, 2, 1))
        remaining = sorted(await redis.execute("KEYS", "sparky:acct:*"))
        self.assertEqual(remaining, [b"sparky:acct:0123456789abcdef0001:anne@example.com",
                                     b"sparky:acct:0123456789abcdef0002:anne@example.com",
                                     b"sparky:acct:0123456789abcdef0003:f*d@example.com"])
        events = await redis.execute("XRANGE", KEYS.events, "-", "+")
        self.assertEqual([e[1][3] for e in events], [b"anne@example.com"])
        self.assertEqual(await redis.execute("XLEN", KEYS.dead_letters), 1)

    async def test_glob_characters_are_literal(self) -> None:
        redis = await self.fill()
        erased = await erase_recipient(redis, KEYS, "f*d@example.com")
        self.assertEqual(erased.delivery_facts, 1)
        self.assertEqual(len(await redis.execute("KEYS", "sparky:acct:*")), 4)

    async def test_command_line(self) -> None:
        await self.fill()
        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write(f"[redis]\nurl = {shared_server().url}\n")
        result = await threads.deferToThread(
            subprocess.run, [venv_script("sparkytwist"), "-c", ini, "erase", "fred@example.com"],
            capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "erased fred@example.com: 2 delivery fact(s), "
                         "2 queued event(s), 1 dead-letter batch(es)")
