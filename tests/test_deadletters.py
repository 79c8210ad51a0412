"""Dead letters: listed, and sent again once the cause is fixed (a new key)."""

from __future__ import annotations

import gzip
import json
import subprocess
import time

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from sparkytwist.feeder.deadletters import dead_letters, resend
from sparkytwist.feeder.sinks import SparkPostSink
from sparkytwist.redis import Redis
from sparkytwist.store import Keys
from tests.support.fake_ingest import listen_fake_ingest
from tests.support.http import http_client
from tests.support.processes import venv_script
from tests.support.redis import fresh_redis, shared_server

KEYS = Keys()
KEY = "fixed-key"


def batch(event_id: int) -> bytes:
    event = {"type": "open", "delv_method": "esmtp", "event_id": str(event_id),
             "message_id": "0123456789abcdef0123", "rcpt_to": "fred@example.com",
             "raw_rcpt_to": "fred@example.com", "timestamp": str(int(time.time())),
             "user_agent_parsed": {"agent_family": "Other", "os_family": "Other",
                                   "device_family": "Other", "is_mobile": False,
                                   "is_proxy": False, "is_prefetched": False}}
    return gzip.compress(json.dumps({"msys": {"track_event": event}}).encode() + b"\n")


async def dead_letter(redis: Redis, event_id: int) -> None:
    await redis.execute("XADD", KEYS.dead_letters, "*", "reason", "HTTP 401", "status", 401,
                        "events", 1, "first_id", "1-0", "last_id", "1-0", "at", 1,
                        "batch", batch(event_id))


class DeadLetterTests(TestCase):
    async def test_resend_delivers_and_deletes_each_batch(self) -> None:
        redis = await fresh_redis(self)
        for event_id in (1, 2, 3):
            await dead_letter(redis, event_id)
        listed = [letter async for letter in dead_letters(redis, KEYS)]
        self.assertEqual([(d.reason, d.events) for d in listed], [("HTTP 401", 1)] * 3)

        _, fake = listen_fake_ingest(reactor, api_key=KEY, testcase=self)
        fake.enqueue(503)  # an outage at the first attempt: nothing is deleted, it stops
        sink = SparkPostSink(http_client(self), fake.url, KEY, reactor)
        sent, stopped = await resend(redis, KEYS, sink)
        self.assertEqual(sent, 0)
        self.assertIn("503", stopped or "")
        sent, stopped = await resend(redis, KEYS, sink)
        self.assertEqual((sent, stopped), (3, None))
        self.assertEqual(sorted(e["event_id"] for e in fake.events), ["1", "2", "3"])
        self.assertEqual(await redis.execute("XLEN", KEYS.dead_letters), 0)

    async def test_command_line(self) -> None:
        redis = await fresh_redis(self)
        await dead_letter(redis, 7)
        _, fake = listen_fake_ingest(reactor, api_key=KEY, testcase=self)
        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write(f"[redis]\nurl = {shared_server().url}\n"
                    f"[feeder]\nsparkpost_host = {fake.url}\nsparkpost_api_key = {KEY}\n")

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([venv_script("sparkytwist"), "-c", ini, *args],
                                  capture_output=True, text=True, timeout=60, check=False)

        listed = await threads.deferToThread(run, "dead-letters")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, r"^\d+-\d+\s+1 events\s+HTTP 401\n$")
        resent = await threads.deferToThread(run, "dead-letters", "resend")
        self.assertEqual((resent.returncode, resent.stdout), (0, "resent 1 batch(es)\n"),
                         resent.stderr)
        self.assertEqual([e["event_id"] for e in fake.events], ["7"])
