"""The accounting reader as ``twistd etl`` (stdin, --file) and as a sparkytrack part."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sparkytwist.accounting.reader import AccountingReader
from sparkytwist.accounting.service import NO_COMMAND, AccountingService, EtlService, make_service
from sparkytwist.accounting.stats import Stats
from sparkytwist.accounting.writer import DeliveryWriter
from sparkytwist.backoff import Backoff
from sparkytwist.config import Settings
from sparkytwist.metrics import Metrics
from sparkytwist.service import Context
from sparkytwist.store import Keys
from tests.support.ports import free_port
from tests.support.processes import twistd
from tests.support.redis import connect, fresh_redis, private_server, shared_server
from tests.test_accounting import HEADER, SAMPLE, capture_logs, d_line
from tests.test_accounting_writer import FakeRedis

SAMPLE_PATH = Path(__file__).parent / "data" / "acct" / "sample.csv"
SAMPLE_KEYS = [
    b"sparky:acct:5e847c40a1b2c3d4e5f6:alice@example.org",
    b"sparky:acct:5e847c41b2c3d4e5f6a7:bob.smith@outlook.com",
    b"sparky:acct:5e848288c4d5e6f7a8b9:sybil@example.org",
]


def etl_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKYTWIST_", "SPARKPOST_"))}
    env["SPARKYTWIST_REDIS_URL"] = redis_url
    return env


class EtlProgramTests(TestCase):
    """``twistd -n --pidfile= etl`` as a real subprocess, the way PMTA runs it."""

    timeout = 60

    def run_etl(self, *args: str, stdin: bytes | None, url: str) -> tuple[int, str]:
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        proc = subprocess.run(twistd("etl", *args), check=False, input=stdin, capture_output=True,
                              cwd=workdir, env=etl_env(url), timeout=45)
        self.assertFalse((workdir / "var").exists(), "etl must not create var/ (token key)")
        return proc.returncode, proc.stdout.decode() + proc.stderr.decode()

    async def test_stdin_pipe_to_redis_hashes_with_ttl_then_exit_0(self) -> None:
        redis = await fresh_redis(self)
        rc, output = self.run_etl(stdin=SAMPLE, url=shared_server().url)
        self.assertEqual(rc, 0, output)
        self.assertIn("reading PMTA accounting CSV from stdin", output)
        self.assertIn("etl: done", output)
        self.assertEqual(len(await redis.execute("KEYS", "sparky:acct:*")), 8)
        bob = await redis.execute("HGETALL", SAMPLE_KEYS[1])
        self.assertEqual(dict(zip(bob[::2], bob[1::2], strict=True)), {
            b"campaign_id": b"newsletter-14", b"friendly_from": b"bounces@mail.example.com",
            b"sending_ip": b"203.0.113.11", b"ip_pool": b"pool-b",
            b"routing_domain": b"outlook.com", b"delivered_at": b"1585740902"})
        for key in SAMPLE_KEYS:
            ttl = int(await redis.execute("TTL", key))
            self.assertTrue(0 < ttl <= 10 * 86400, (key, ttl))

    async def test_file_backfill_with_summary(self) -> None:
        redis = await fresh_redis(self)
        rc, output = self.run_etl("--file", str(SAMPLE_PATH), "--acct-ttl", "1h",
                                  stdin=b"", url=shared_server().url)
        self.assertEqual(rc, 0, output)
        self.assertIn(f"etl: loading {SAMPLE_PATH}", output)
        self.assertRegex(output, r"etl: done in [\d.]+s: 25 records read \(b=3, d=10, .*\), "
                                 r"8 stored, 17 skipped \(by type: b=3, d=2, .*\), 0 malformed")
        ttl = int(await redis.execute("TTL", SAMPLE_KEYS[0]))
        self.assertTrue(0 < ttl <= 3600, ttl)

    def test_redis_down_at_eof_never_exits_0(self) -> None:
        """With nothing stored, the etl keeps retrying; SIGTERM ends it, not with 0."""
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        log = workdir / "etl.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                twistd("etl", "--redis-timeout", "0.3"), stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.STDOUT, cwd=workdir,
                env=etl_env(f"redis://127.0.0.1:{free_port()}/0"))
            self.addCleanup(lambda: proc.poll() is None and proc.kill())
            assert proc.stdin is not None
            proc.stdin.write(SAMPLE)
            proc.stdin.close()
            deadline = time.monotonic() + 20
            while "end of input" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertIsNone(proc.poll(), log.read_text())  # still retrying
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        output = log.read_text()
        self.assertNotEqual(rc, 0, output)
        self.assertIn("8 records read but NOT written to Redis", output)
        self.assertIn("Redis is unavailable", output)


class EtlBackpressureTests(SynchronousTestCase):
    """The real stdin path: while Redis is down the etl stops reading and PMTA's write blocks."""

    def test_pipe_blocks_while_redis_is_down_then_everything_arrives(self) -> None:
        import threading

        server = private_server()
        server.start()
        server.stop()  # down from the start; comes back on the same port later
        self.addCleanup(server.stop)
        n = 60_000  # ~6 MB: far more than the pipe plus the reader's high water hold
        data = HEADER + b"".join(d_line(i) for i in range(n))
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        log = workdir / "etl.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                twistd("etl", "--redis-timeout", "0.5"), stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.STDOUT, cwd=workdir, env=etl_env(server.url))
            self.addCleanup(lambda: proc.poll() is None and proc.kill())
            assert proc.stdin is not None
            stdin = proc.stdin
            writer = threading.Thread(target=lambda: (stdin.write(data), stdin.close()))
            writer.start()
            deadline = time.monotonic() + 20
            while "Redis is unavailable" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertIn("reading paused", log.read_text())
            writer.join(1.0)
            self.assertTrue(writer.is_alive(), "the etl kept reading while Redis was down")
            server.start()
            writer.join(30)
            self.assertFalse(writer.is_alive())
            rc = proc.wait(30)
        output = log.read_text()
        self.assertEqual(rc, 0, output)
        self.assertIn(f"{n} records read (d={n}), {n} stored", output)
        cli = subprocess.run(
            [os.path.join(os.path.dirname(server_binary()), "redis-cli"), "-p",
             str(server.port), "DBSIZE"], capture_output=True, text=True, check=True)
        self.assertEqual(int(cli.stdout), n)


def server_binary() -> str:
    from sparkytwist.embedded import find_redis_server

    return find_redis_server()


class RedisOutageTests(TestCase):
    """Redis stopped mid-stream: reading pauses, and nothing is lost once it returns."""

    timeout = 60

    async def wait_for(self, condition: Any, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await task.deferLater(reactor, 0.02, lambda: None)

    async def test_pause_while_down_then_resume_without_loss(self) -> None:
        server = private_server()
        server.start()
        self.addCleanup(server.stop)
        redis = connect(self, server.url, timeout=0.5)
        stats = Stats()
        writer = DeliveryWriter(redis, Keys("sparky:"), ttl=600, clock=reactor, stats=stats,
                                batch_size=100, backoff=Backoff(0.1, 0.5))
        reader = AccountingReader(writer, stats, reactor)
        producer = StringTransport()
        reader.attach(producer)
        total = 0

        def feed(n: int) -> None:
            nonlocal total
            reader.feed(b"".join(d_line(i) for i in range(total, total + n)))
            total += n

        reader.feed(HEADER)
        feed(500)
        await writer.drain()
        server.stop()
        feed(300)  # the writes of these fail
        await self.wait_for(lambda: producer.producerState == "paused", "reading to pause")
        self.assertTrue(writer.redis_down)
        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(producer.producerState, "paused")  # stays paused while down
        server.start()
        await self.wait_for(lambda: producer.producerState == "producing", "reading to resume")
        feed(200)
        await writer.drain()
        # The restarted server has no persistence: the first 500 went with it. Every
        # record read during and after the outage is there.
        keys = set(await redis.execute("KEYS", "sparky:acct:*"))
        expected = {f"sparky:acct:{i:020x}:user{i}@example.com".encode()
                    for i in range(500, total)}
        self.assertEqual(keys, expected)
        self.assertEqual((total, stats.stored, writer.pending), (1000, 1000, 0))
        self.assertGreater(stats.write_failures, 0)
        self.assertGreater(stats.paused_seconds, 0.5)


class SparkytrackPartTests(TestCase):
    """The part of ``twistd sparkytrack``: runs accounting_command, stops cleanly."""

    timeout = 30

    async def test_command_output_stored_and_summary_on_stop(self) -> None:
        logs = capture_logs(self)
        redis = await fresh_redis(self)
        ctx = Context(settings=Settings(accounting_command=f"cat {SAMPLE_PATH}; exec sleep 60"),
                      reactor=reactor, redis=redis, metrics=Metrics(), keys=Keys(),
                      codec=None)  # type: ignore[arg-type]
        service = make_service(ctx)
        assert isinstance(service, AccountingService)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        deadline = time.monotonic() + 15
        while service.stats.stored < 8 and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        await service.stopService()
        self.assertEqual(len(await redis.execute("KEYS", "sparky:acct:*")), 8)
        self.assertTrue(any("accounting: 25 records read" in line for line in logs), logs)
        self.assertEqual(service.stats.restarts, 0)
        self.assertIn("sparkytwist_acct_stored_total 8.0", ctx.metrics.exposition().decode())


def settings(**changes: Any) -> Settings:
    return Settings(**changes)


def clock_context(**changes: Any) -> tuple[Context, FakeRedis, Clock]:
    clock = Clock()
    fake = FakeRedis()
    ctx = Context(settings=settings(**changes), reactor=clock, redis=fake,  # type: ignore[arg-type]
                  metrics=Metrics(), keys=Keys(), codec=None)  # type: ignore[arg-type]
    return ctx, fake, clock


class PartTests(SynchronousTestCase):
    def test_without_a_command_the_part_says_why(self) -> None:
        ctx, _, _ = clock_context()
        self.assertEqual(make_service(ctx), NO_COMMAND)

    def test_with_a_command_metrics_are_registered(self) -> None:
        ctx, _, _ = clock_context(accounting_command="tail -F -n +1 /tmp/acct.csv")
        service = make_service(ctx)
        self.assertIsInstance(service, AccountingService)
        text = ctx.metrics.exposition().decode()
        for name in ("acct_stored_total", "acct_batches_total", "acct_write_failures_total",
                     "acct_paused_seconds_total", "acct_command_restarts_total"):
            self.assertIn(f"sparkytwist_{name}", text)

    def test_registered_in_part_factories(self) -> None:
        from sparkytwist.tap import PART_FACTORIES

        self.assertEqual(PART_FACTORIES["accounting"],
                         "sparkytwist.accounting.service:make_service")


class EtlServiceTests(SynchronousTestCase):
    """The etl service with a Clock: progress lines while loading a file, then the summary."""

    def test_progress_lines_and_summary_for_a_file(self) -> None:
        logs = capture_logs(self)
        ctx, fake, clock = clock_context()
        path = Path(self.mktemp())
        path.write_bytes(HEADER + b"".join(d_line(i) for i in range(30_000)))
        done: list[bool] = []
        service = EtlService(ctx, path=str(path), on_done=lambda: done.append(True),
                             progress_interval=5.0)
        service.startService()
        answered = 0
        while not done:
            clock.advance(0.5)  # one batch answered each half second: it takes ~15 s
            if answered < len(fake.answers):
                fake.answers[answered].callback(0)
                answered += 1
        progress = [line for line in logs if "etl: progress" in line]
        self.assertTrue(progress)
        self.assertRegex(progress[0], r"\d+ records read, \d+ stored, 0 skipped, 0 malformed, "
                                      r"\d+ records/s, \d+% of the file")
        self.assertGreaterEqual(len(progress), 2)
        self.assertIn("30000 records read (d=30000), 30000 stored", logs[-1])
        self.successResultOf(service.finished)
