"""Benchmark: the feeder end to end (stream -> enrich -> NDJSON -> gzip -> Ingest -> XACK).

N events are XADDed first (untimed, 1000 per Lua call), with delivery facts for every
recipient, into a private redis-server (unix socket, no AOF). Then, timed:

* baseline: the same entries read with XRANGE (1000 a call) and written to /dev/null;
* feeder: the real feeder (consumer group, enrichment, geo off, UA cache, 5 MB batches)
  uploading to the fake Ingest server, until every event was acknowledged with a 200.

The fake runs in a subprocess (``--serve-fake``) so that its gunzip and per-line
validation do not run on the feeder's reactor; it still checks every line and the
run fails if any line broke the contract or an event id arrived twice.

    .venv/bin/python bench/feeder.py [--events 1000000] [--max-age 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEY = "bench-ingest-key"

_XADD_MANY = """
local n = 0
for i = 1, #ARGV, 7 do
  local f = {'type', ARGV[i], 'msg', ARGV[i+1], 'rcpt', ARGV[i+2], 'ts', ARGV[i+3],
             'ip', ARGV[i+4], 'ua', ARGV[i+5]}
  if ARGV[i+6] ~= '' then f[#f+1] = 'url'; f[#f+1] = ARGV[i+6] end
  redis.call('XADD', KEYS[1], '*', unpack(f))
  n = n + 1
end
return n
"""

_HSET_MANY = """
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'campaign_id', ARGV[1], 'subaccount_id', ARGV[2],
             'friendly_from', ARGV[3], 'sending_ip', ARGV[4], 'ip_pool', ARGV[5],
             'routing_domain', ARGV[6], 'delivered_at', ARGV[7])
end
return #KEYS
"""

UAS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.6045.163 Mobile Safari/537.36",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
    "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
]


def _rcpt(i: int) -> str:
    return f"firstname.lastname{i}@{('gmail.com', 'yahoo.com', 'outlook.com')[i % 3]}"


# --- the fake, in its own process ---------------------------------------------------


def serve_fake(validate_every: int) -> None:
    """Serve FakeIngest on a free port (printed), counting instead of keeping events."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from tests.support.fake_ingest import FakeIngest

    event_id = re.compile(rb'"event_id":"(\d+)"')

    class CountingIngest(FakeIngest):
        """Checks the request of every batch and every line of one batch in
        ``validate_every`` (all of them with 1); counts lines and event ids of all."""

        def __init__(self, clock: Any, api_key: str) -> None:
            super().__init__(clock, api_key)
            self.ids: set[bytes] = set()
            self.total = 0
            self.raw = 0
            self.compressed = 0
            self.seen = 0

        def _parse_lines(self, raw: bytes) -> tuple[list[dict[str, Any]], list[str]]:
            self.seen += 1
            self.raw += len(raw)
            found = event_id.findall(raw)
            self.total += len(found)
            self.ids.update(found)
            if raw.count(b"\n") != len(found):
                return [], ["a line without an event_id"]
            if (self.seen - 1) % validate_every == 0:
                return super()._parse_lines(raw)
            return [], []

        def render(self, request: Any) -> Any:
            result = super().render(request)
            for batch in self.batches:
                self.compressed += batch.compressed_size
            self.events.clear()
            self.batches.clear()
            for r in self.requests:
                r.body = b""
            return result

    fake = CountingIngest(reactor, KEY)

    class Stats(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return json.dumps({
                "events": fake.total, "distinct": len(fake.ids), "raw": fake.raw,
                "gzip": fake.compressed, "requests": len(fake.requests),
                "violations": fake.violations[:5]}).encode()

    class Root(Resource):
        def getChild(self, path: bytes, request: Any) -> Resource:
            return Stats() if path == b"stats" else fake

    port = reactor.listenTCP(0, Site(Root()), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


# --- the run ---------------------------------------------------------------------


async def fill(redis: Any, keys: Any, n: int, recipients: int) -> None:
    from sparkytwist.redis import Script

    xadd, hset = Script(_XADD_MANY), Script(_HSET_MANY)
    rnd = random.Random(1)
    msg_of = [f"{int(time.time()):08x}{rnd.getrandbits(48):012x}" for _ in range(recipients)]
    for start in range(0, recipients, 1000):
        ks = [keys.delivery(msg_of[i], _rcpt(i)) for i in range(start,
                                                                 min(start + 1000, recipients))]
        await hset(redis, ks, ["spring-sale-2024", "12", "news@shop.example.com",
                               "198.51.100.9", "pool1", "gmail.com", "1700000000"])
    now_ms = int(time.time() * 1000)
    for start in range(0, n, 1000):
        args: list[Any] = []
        for i in range(start, min(start + 1000, n)):
            r = rnd.randrange(recipients)
            click = i % 4 == 0
            args += ["click" if click else "open", msg_of[r], _rcpt(r), now_ms,
                     f"203.0.113.{i % 250}", UAS[i % len(UAS)],
                     f"https://shop.example.com/p/{i % 5000}?utm_source=mail" if click else ""]
        await xadd(redis, [keys.events], args)


async def baseline(redis: Any, stream: bytes, n: int) -> float:
    start = time.perf_counter()
    seen = 0
    cursor = b"-"
    with open(os.devnull, "wb") as null:
        while seen < n:
            page = await redis.execute("XRANGE", stream, cursor, "+", "COUNT", 1000)
            if not page:
                break
            for _entry_id, flat in page:
                null.write(b" ".join(flat) + b"\n")
            seen += len(page)
            cursor = b"(" + page[-1][0]
    elapsed = time.perf_counter() - start
    assert seen == n, (seen, n)
    return elapsed


async def run(reactor: Any, args: argparse.Namespace) -> None:
    import treq
    from twisted.internet import task
    from twisted.web.client import Agent, HTTPConnectionPool

    from sparkytwist.config import Settings
    from sparkytwist.embedded import RedisServer
    from sparkytwist.feeder.service import FeederService, build_feeder
    from sparkytwist.metrics import Metrics
    from sparkytwist.redis import Redis
    from sparkytwist.store import FEEDER_GROUP, Keys

    n = args.events
    fake = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-fake",
                             "--validate-every", str(args.validate_every)],
                            stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))
    assert fake.stdout is not None
    port = int(fake.stdout.readline())
    directory = tempfile.mkdtemp(prefix="sparky-bench-")
    server = RedisServer(directory, appendonly=False)
    server.start()
    try:
        redis = Redis(timeout=30.0, clock=reactor, url=server.url)
        redis.open()
        keys = Keys("bench:")
        t0 = time.perf_counter()
        await fill(redis, keys, n, args.recipients)
        print(f"filled {n:,} events in {time.perf_counter() - t0:.1f}s (untimed)")

        base = await baseline(redis, keys.events, n)
        print(f"baseline XRANGE -> /dev/null: {base:.2f}s  {n / base:,.0f} events/s")

        settings = replace(Settings(), sparkpost_api_key=KEY,
                           sparkpost_host=f"http://127.0.0.1:{port}", feeder_name="bench",
                           batch_max_age=args.max_age)
        metrics = Metrics()
        pool = HTTPConnectionPool(reactor, persistent=True)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        service = build_feeder(settings, redis=redis, keys=keys, metrics=metrics,
                               reactor=reactor, http=http)
        assert isinstance(service, FeederService), service
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        start = time.perf_counter()
        service.startService()
        sent = 0.0
        while sent < n:
            await task.deferLater(reactor, 0.05, lambda: None)
            sent = metrics.registry.get_sample_value(
                "sparkytwist_feeder_events_sent_total", {"sink": "sparkpost"}) or 0.0
            if time.perf_counter() - start > args.limit:
                raise SystemExit(f"only {sent:,.0f} of {n:,} events after {args.limit}s")
        await service.feeder.settle()
        feed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        await service.stopService()
        await pool.closeCachedConnections()
        pending = await redis.execute("XPENDING", keys.events, FEEDER_GROUP)
        response = await treq.get(f"http://127.0.0.1:{port}/stats")
        stats = json.loads(await response.content())
        await redis.close()
    finally:
        server.stop()
        fake.terminate()
        fake.wait()
        shutil.rmtree(directory, ignore_errors=True)
    if stats["violations"] or stats["distinct"] != n or int(pending[0]) != 0:
        raise SystemExit(f"FAILED: {stats}, pending {pending[0]}")
    ratio = stats["raw"] / stats["gzip"]
    print(f"feeder -> fake Ingest:          {feed:.2f}s  {n / feed:,.0f} events/s "
          f"({stats['requests']} batches, {stats['raw'] / 1e6:,.0f} MB raw, "
          f"{stats['gzip'] / 1e6:,.1f} MB gzip, ratio {ratio:.1f}x)")
    print(f"feeder / baseline time: {feed / base:.1f}x; every event once, none pending")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--recipients", type=int, default=100_000,
                        help="distinct (message, recipient) pairs with delivery facts")
    parser.add_argument("--max-age", type=float, default=1.0,
                        help="batch_max_age (s); small so the last batch does not wait 30 s")
    parser.add_argument("--limit", type=float, default=600.0, help="give up after (s)")
    parser.add_argument("--validate-every", type=int, default=10,
                        help="the fake checks every line of one batch in this many "
                        "(1 = all); it counts the event ids of all")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the feeder phase")
    parser.add_argument("--verbose", action="store_true", help="show the feeder's log")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.validate_every)
        return
    from twisted.internet import defer, task

    if args.verbose:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
