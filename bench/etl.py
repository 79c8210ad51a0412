"""Benchmark: the accounting reader end to end (twistd etl on a pipe → Redis).

One million generated ``d`` records (by default) are written to the stdin of a
real ``twistd -n --pidfile= etl`` subprocess, which stores them in a private
redis-server; the rate is records/s from spawn to exit (start-up included). The
baseline, in the same run and against the same server: the same records' HSET +
EXPIRE sent from this process with txredisapi, pipelined 1000 records (2000
commands) at a time, the keys and field values prepared beforehand (no parsing).
The baseline writes the first 250,000 records by default (its rate is steady and a
million would take ~100 s; ``--baseline-records 0`` for all of them).

    .venv/bin/python bench/etl.py [--records 1000000] [--baseline-records 250000] [--tcp]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from etl_parse import make_lines

from sparkytwist.acctcsv import AccountingParser, delivery_facts
from sparkytwist.embedded import RedisServer, find_redis_server
from sparkytwist.redis import RedisAddress
from sparkytwist.store import Keys

TTL = 864000
GOAL = 50_000
BASELINE_BATCH = 1000


def twistd() -> str:
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def redis_cli(server: RedisServer, *args: str) -> str:
    cli = os.path.join(os.path.dirname(find_redis_server()), "redis-cli")
    where = (["-s", str(server.socket_path)] if server.socket_path
             else ["-p", str(server.port)])
    return subprocess.run([cli, *where, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def run_etl(server: RedisServer, data: bytes, workdir: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKYTWIST_")}
    env["SPARKYTWIST_REDIS_URL"] = server.url
    log_path = os.path.join(workdir, "etl.log")
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([twistd(), "-n", "--pidfile=", "etl"], stdin=subprocess.PIPE,
                                stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
        assert proc.stdin is not None
        view = memoryview(data)
        for off in range(0, len(data), 1 << 20):
            proc.stdin.write(view[off : off + (1 << 20)])
        proc.stdin.close()
        rc = proc.wait(600)
        elapsed = time.perf_counter() - start
    with open(log_path) as f:
        summary = [line for line in f if "etl: done" in line]
    if rc != 0 or not summary:
        sys.exit(f"etl failed (exit {rc}); see {log_path}")
    print("  " + summary[-1].split("] ", 1)[-1].strip())
    return elapsed


def prepare(data: bytes) -> list[tuple[bytes, list[str]]]:
    """(key, [field, value, ...]) per record: what the baseline sends, parsed in advance."""
    keys = Keys()
    parser = AccountingParser()
    out = []
    for r in parser.feed(data) + parser.finish():
        f = delivery_facts(r)
        assert f is not None
        pairs = {"campaign_id": f.campaign_id, "subaccount_id": str(f.subaccount_id or ""),
                 "friendly_from": f.friendly_from, "sending_ip": f.sending_ip,
                 "ip_pool": f.ip_pool, "routing_domain": f.routing_domain,
                 "delivered_at": str(f.delivered_at or "")}
        flat = [x for k, v in pairs.items() if v for x in (k, v)]
        out.append((keys.delivery(f.message_id, f.rcpt), flat))
    return out


def run_baseline(server: RedisServer, records: list[tuple[bytes, list[str]]]) -> float:
    """Seconds for the pipelined HSET + EXPIRE of every record, in this process."""
    import txredisapi
    from twisted.internet import defer, reactor

    result: list[float] = []

    async def main() -> None:
        address = RedisAddress.from_url(server.url)
        if address.path:
            conn = await txredisapi.UnixConnection(address.path, charset=None,
                                                   convertNumbers=False)
        else:
            conn = await txredisapi.Connection(address.host, address.port, charset=None,
                                               convertNumbers=False)
        start = time.perf_counter()
        for off in range(0, len(records), BASELINE_BATCH):
            pipe = await conn.pipeline()
            for key, flat in records[off : off + BASELINE_BATCH]:
                pipe.execute_command("HSET", key, *flat)
                pipe.execute_command("EXPIRE", key, TTL)
            await pipe.execute_pipeline()
        result.append(time.perf_counter() - start)
        await conn.disconnect()

    d = defer.Deferred.fromCoroutine(main())
    d.addErrback(lambda f: f.printTraceback())
    d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if not result:
        sys.exit("baseline failed")
    return result[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--tcp", action="store_true", help="Redis on loopback TCP, not a socket")
    ap.add_argument("--quoted", type=float, default=0.25, help="share of lines with quotes")
    ap.add_argument("--baseline-records", type=int, default=250_000,
                    help="records the baseline writes (its rate is steady; 0 = --records, "
                    "which takes ~100 s for a million)")
    args = ap.parse_args()
    n = args.records
    data = make_lines(n, args.quoted)
    with tempfile.TemporaryDirectory(prefix="sparky-bench-etl-") as workdir:
        server = RedisServer(os.path.join(workdir, "redis"), appendonly=False,
                             use_tcp=args.tcp)
        server.start()
        try:
            print(f"{n} d records, {len(data) / n:.0f} bytes a line, Redis at {server.url}")
            etl = run_etl(server, data, workdir)
            stored = int(redis_cli(server, "DBSIZE"))
            assert stored == n, f"{stored} keys stored, expected {n}"
            redis_cli(server, "FLUSHALL")
            records = prepare(data)
            del data
            nb = min(n, args.baseline_records or n)
            records = records[:nb]
            base = run_baseline(server, records)
            assert int(redis_cli(server, "DBSIZE")) == nb
        finally:
            server.stop()
    etl_rate, base_rate = n / etl, nb / base
    print(f"{'etl (twistd subprocess, stdin pipe)':40s} {etl_rate:>10,.0f} records/s "
          f"({etl:.1f}s)")
    print(f"{'baseline (txredisapi HSET+EXPIRE pipelined)':40s} {base_rate:>10,.0f} records/s "
          f"({nb} records in {base:.1f}s)")
    print(f"ratio etl / baseline: {etl_rate / base_rate:.2f}; goal >= 0.5 and >= {GOAL:,} "
          f"records/s: {'met' if etl_rate >= GOAL and etl_rate >= 0.5 * base_rate else 'NOT met'}")


if __name__ == "__main__":
    main()
