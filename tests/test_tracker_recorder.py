"""The recorder against a real redis-server: batches, outage buffering, overflow, drain."""

from __future__ import annotations

import re
import time
from typing import Any

import treq
from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from sparkytwist.listen import ListeningService
from sparkytwist.metrics import Metrics
from sparkytwist.redis import Redis
from sparkytwist.store import Keys
from sparkytwist.tracker.recorder import EventRecorder
from sparkytwist.tracker.resource import TrackerSite
from sparkytwist.trackevent import TrackEvent
from tests.support.redis import connect, fresh_redis, private_server
from tests.test_tracker import CHROME, URL, make_resource, token

KEYS = Keys("test:")


def event(i: int, ua: str = CHROME) -> TrackEvent:
    return TrackEvent("click", "6745c3a0aabbccddeeff", f"r{i}@example.com",
                      1_700_000_000_000 + i, "203.0.113.9", ua, URL, "p")


async def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await task.deferLater(reactor, 0.05, lambda: None)


async def stream(redis: Redis) -> list[TrackEvent]:
    entries = await redis.execute("XRANGE", KEYS.events, "-", "+")
    return [TrackEvent.from_fields(dict(zip(f[::2], f[1::2], strict=True)))
            for _, f in entries]


def recorder_for(redis: Redis, clock: Any = reactor, **kw: Any) -> tuple[EventRecorder, Metrics]:
    metrics = Metrics()
    kw.setdefault("capacity", 100_000)
    return EventRecorder(redis, KEYS, maxlen=10_000, clock=clock, metrics=metrics, **kw), metrics


class RecorderTests(TestCase):
    async def test_events_land_on_the_stream_in_batches(self) -> None:
        redis = await fresh_redis(self)
        recorder, metrics = recorder_for(redis)
        recorder.startService()
        self.addCleanup(recorder.stopService)
        sent = [event(i) for i in range(2500)]
        sent.append(event(9999, ua="nul\x00inside and ünïcode \udcff"))
        for e in sent:
            self.assertTrue(recorder.record(e))
        self.assertEqual(await redis.execute("XLEN", KEYS.events), 0)  # nothing yet

        async def all_there() -> list[TrackEvent] | None:
            s = await stream(redis)
            return s if len(s) == len(sent) else None

        got = await wait_for(all_there)
        self.assertEqual(got[:-1], sent[:-1])
        self.assertEqual(got[-1].user_agent, "nulinside and ünïcode \ufffd")
        text = metrics.exposition().decode()
        self.assertIn("sparkytwist_tracker_events_recorded_total 2501.0", text)
        batches = float(re.search(r"^sparkytwist_tracker_redis_batches_total (\S+)$", text,
                                  re.MULTILINE).group(1))  # type: ignore[union-attr]
        self.assertLessEqual(batches, 10)  # 1000 a batch at most, not one write per event

    async def test_stop_writes_what_is_buffered(self) -> None:
        redis = await fresh_redis(self)
        recorder, _ = recorder_for(redis)
        recorder.startService()
        for i in range(1500):
            recorder.record(event(i))
        await recorder.stopService()
        self.assertEqual(await redis.execute("XLEN", KEYS.events), 1500)

    async def test_redis_outage_clicks_redirect_and_events_arrive_later(self) -> None:
        server = private_server()
        server.start()
        self.addCleanup(server.stop)
        redis = connect(self, server.url, timeout=0.5)
        await redis.ping()
        recorder, metrics = recorder_for(redis)
        recorder.startService()
        self.addCleanup(recorder.stopService)
        res = make_resource(recorder, clock=reactor)  # type: ignore[arg-type]
        listening = ListeningService("tracker", "tcp:0:interface=127.0.0.1", TrackerSite(res),
                                     reactor)
        listening.startService()
        self.addCleanup(listening.stopService)
        assert listening.port is not None
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        base = f"http://127.0.0.1:{listening.port.getHost().port}"

        server.stop()
        rcpts = [f"person{i}@example.com" for i in range(40)]
        for rcpt in rcpts:
            started = time.monotonic()
            response = await http.get(
                f"{base}/{token('c', URL, rcpt=rcpt).decode()}", allow_redirects=False)
            await response.content()
            self.assertEqual(response.code, 302)
            self.assertEqual(response.headers.getRawHeaders(b"location"), [URL.encode()])
            self.assertLess(time.monotonic() - started, 0.4)  # never waits for Redis
        async def failed() -> bool:
            return b"tracker_redis_failures_total 0.0" not in metrics.exposition()

        self.assertTrue(await wait_for(failed))
        self.assertEqual(recorder.pending, 40)
        self.assertIn(b"sparkytwist_tracker_events_buffered 40.0", metrics.exposition())

        server.start()
        redis2 = connect(self, server.url)

        async def arrived() -> list[TrackEvent] | None:
            s = await stream(redis2)
            return s if len({e.rcpt for e in s}) == len(rcpts) else None

        got = await wait_for(arrived)
        self.assertEqual({e.rcpt for e in got}, set(rcpts))
        self.assertLessEqual(len(got), 2 * len(rcpts))  # at-least-once: a retry may repeat
        self.assertEqual(recorder.pending, 0)


class OverflowTests(SynchronousTestCase):
    def test_overflow_counted_and_logged(self) -> None:
        clock = task.Clock()
        redis = Redis(timeout=1, clock=clock, url="redis://127.0.0.1:1/0")  # never opened
        logged: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        recorder, metrics = recorder_for(redis, clock=clock, capacity=0, batch_size=10)
        recorder.startService()
        accepted = [recorder.record(event(i)) for i in range(25)]
        self.assertEqual(accepted, [True] * 10 + [False] * 15)
        clock.advance(1)  # a write attempt fails: the batch goes back into the buffer
        self.assertEqual(recorder.pending, 10)
        self.assertFalse(recorder.record(event(99)))
        text = metrics.exposition().decode()
        self.assertIn('sparkytwist_tracker_events_dropped_total{reason="overflow"} 16.0', text)
        self.assertIn("sparkytwist_tracker_events_buffered 10.0", text)
        self.assertNotIn("sparkytwist_tracker_redis_failures_total 0.0", text)
        overflow_lines = [e for e in logged if "buffer full" in e.get("log_format", "")]
        self.assertEqual(len(overflow_lines), 1)  # rate limited, with the count
        self.assertEqual(overflow_lines[0]["count"], 1)
        for _ in range(30):
            clock.advance(5)  # retries back off, never give up while running
        self.assertEqual(recorder.pending, 10)
        d = recorder.stopService()
        self.successResultOf(d)
        self.assertIn('reason="shutdown"} 10.0', metrics.exposition().decode())
