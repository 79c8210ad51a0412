"""Sources of accounting bytes: a file read in chunks, a spawned command restarted."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sparkytwist.accounting.reader import AccountingReader
from sparkytwist.accounting.sources import CommandService, FileReader
from sparkytwist.accounting.stats import Stats
from sparkytwist.accounting.writer import DeliveryWriter
from sparkytwist.metrics import Metrics
from sparkytwist.redis import RedisUnavailable
from sparkytwist.store import Keys
from tests.support.redis import fresh_redis
from tests.test_accounting import HEADER, Harness, capture_logs, d_line


class FileReaderTests(SynchronousTestCase):
    def test_reads_in_chunks_honours_pause_and_ends_once(self) -> None:
        h = Harness(batch_size=50, max_in_flight=1, high_water=100)
        data = HEADER + b"".join(d_line(i) for i in range(400))
        ended: list[bool] = []
        fr = FileReader(io.BytesIO(data), h.reader, h.clock, lambda: ended.append(True),
                        chunk=4096)
        fr.start()
        h.clock.advance(0)  # reads chunk after chunk until 100 records wait
        self.assertTrue(h.writer.paused)
        position = fr.position
        self.assertEqual(position % 4096, 0)
        self.assertLess(position, len(data))
        h.redis.answers[0].errback(RedisUnavailable("down"))
        for _ in range(5):
            h.clock.advance(0.1)
        self.assertEqual(fr.position, position)  # nothing read while paused
        h.clock.advance(1)  # the retry goes out
        while not ended:
            h.redis.succeed_all()
            h.clock.advance(0.01)
        h.redis.succeed_all()
        self.assertEqual(fr.position, len(data))
        self.assertEqual((h.stats.read, h.stats.stored, h.writer.pending), (400, 400, 0))
        self.assertEqual(ended, [True])


class CommandTests(TestCase):
    """A real ``/bin/sh -c`` command through the reactor, into the test's Redis."""

    timeout = 30

    async def wait_for(self, condition: Any, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await task.deferLater(reactor, 0.05, lambda: None)

    async def test_a_dying_command_is_restarted_and_each_run_is_stored(self) -> None:
        redis = await fresh_redis(self)
        workdir = Path(self.mktemp())
        workdir.mkdir()
        counter = workdir / "runs"
        # Each run prints the header and one record with a new message id, then fails.
        command = (
            f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
            f'printf "{HEADER.decode().strip()}\\r\\n'
            f"d,2020-04-01 12:34:56+0100,b@example.com,Rcpt$n@Example.com,"
            f'0000000000000000000$n,job\\r\\n"; echo oops >&2; exit 1')
        logs = capture_logs(self)
        metrics = Metrics()
        stats = Stats(metrics)
        writer = DeliveryWriter(redis, Keys("sparky:"), ttl=60, clock=reactor, stats=stats,
                                max_delay=0.001)
        reader = AccountingReader(writer, stats, reactor)
        service = CommandService(command, reader, reactor, stats, restart_first=0.05,
                                 restart_max=1.0)
        service.startService()
        self.addCleanup(service.stopService)
        await self.wait_for(lambda: stats.stored >= 3, "three runs stored")
        for n in (1, 2, 3):
            key = f"sparky:acct:0000000000000000000{n}:rcpt{n}@example.com".encode()
            self.assertEqual(await redis.execute("HGET", key, "campaign_id"), b"job")
        self.assertGreaterEqual(stats.restarts, 2)
        self.assertIn("sparkytwist_acct_command_restarts_total", metrics.exposition().decode())
        # stderr is logged, rate-limited: one line in 10 s however often the command dies.
        self.assertEqual(len([line for line in logs if "stderr" in line]), 1)
        self.assertIn("oops", next(line for line in logs if "stderr" in line))
        self.assertTrue(any("restarting in" in line for line in logs))
        await defer.maybeDeferred(service.stopService)

    async def test_stop_ends_the_whole_pipeline(self) -> None:
        redis = await fresh_redis(self)
        workdir = Path(self.mktemp())
        workdir.mkdir()
        pidfile = workdir / "sleep.pid"
        stats = Stats()
        writer = DeliveryWriter(redis, Keys(), ttl=60, clock=reactor, stats=stats)
        reader = AccountingReader(writer, stats, reactor)
        service = CommandService(f"sleep 60 & echo $! > {pidfile}; wait", reader, reactor,
                                 stats, stop_timeout=5)
        service.startService()
        await self.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(),
                            "the pipeline to start")
        pid = int(pidfile.read_text())
        await service.stopService()
        await self.wait_for(lambda: not _alive(pid), "the background sleep to end", 5)
        self.assertEqual(stats.restarts, 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead enough (its parent, the shell, is gone and init reaps it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
