"""Benchmark: PMTA accounting parsing (AccountingParser + delivery_facts) vs csv.reader.

Generates realistic ``d`` lines (~300 bytes, a quarter with a quoted dsnDiag holding
commas), feeds them in 64 KB chunks, and compares with a plain ``csv.reader`` over
the same text in the same run (no checks, no field names, no facts).

    python bench/etl_parse.py [--records 300000] [--chunk 65536] [--quoted 0.25]
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import random
import time

from sparkytwist.acctcsv import AccountingParser, delivery_facts

HEADER = (
    "type,timeLogged,orig,rcpt,dsnAction,dsnStatus,dsnDiag,dsnMta,dlvType,dlvSourceIp,"
    "dlvDestinationIp,dlvSize,vmta,jobId,vmtaPool,"
    "header_x-sp-message-id,header_x-job,header_x-sp-subaccount-id"
)

_MX = [
    (
        "gmail.com",
        "gmail-smtp-in.l.google.com (142.250.102.26)",
        "142.250.102.26",
        "smtp;250 2.0.0 OK  1585740896 x7si1234567qkb.123 - gsmtp",
    ),
    ("yahoo.com", "mta7.am0.yahoodns.net (67.195.204.72)", "67.195.204.72", "smtp;250 ok dirdel"),
    (
        "outlook.com",
        "outlook-com.olc.protection.outlook.com (104.47.55.33)",
        "104.47.55.33",
        '"smtp;250 2.6.0 <20200401.0123@mail.example.com> [InternalId=1211, '
        'Hostname=DM6NAM04HT123.eop-nam04.prod.protection.outlook.com] Queued mail"',
    ),
]


def make_lines(n: int, quoted: float, seed: int = 1) -> bytes:
    """The header and n ``d`` records, CRLF-terminated, as PMTA writes them."""
    rnd = random.Random(seed)
    out = [HEADER]
    t0 = 1585740896
    for i in range(n):
        ts = t0 + i // 2000  # about 2000 deliveries a second
        when = time.strftime("%Y-%m-%d %H:%M:%S+0000", time.gmtime(ts))
        domain, mta, ip, diag = _MX[2] if rnd.random() < quoted else _MX[rnd.randrange(2)]
        out.append(
            f"d,{when},bounces@mail.example.com,"
            f"firstname.lastname{rnd.randrange(10**6)}@{domain},relayed,2.0.0 (success),"
            f"{diag},{mta},smtp,203.0.113.{10 + i % 8},{ip},{4000 + rnd.randrange(2000)},"
            f"mta{i % 8},spring-sale-2020,pool1,{ts:08x}{rnd.getrandbits(48):012x},,"
            f"{rnd.randrange(100)}"
        )
    return ("\r\n".join(out) + "\r\n").encode()


def bench_baseline(data: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    rows = 0
    for _row in csv.reader(io.StringIO(data.decode(), newline="")):
        rows += 1
    return rows - 1, time.perf_counter() - start


def bench_parser(data: bytes, chunk: int, facts: bool) -> tuple[int, float]:
    start = time.perf_counter()
    parser = AccountingParser()
    n = 0
    for off in range(0, len(data), chunk):
        records = parser.feed(data[off : off + chunk])
        n += len(records)
        if facts:
            for r in records:
                delivery_facts(r)
    n += len(parser.finish())
    elapsed = time.perf_counter() - start
    assert parser.counts.malformed == 0, parser.last_problem
    return n, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--quoted", type=float, default=0.25, help="share of lines with quotes")
    ap.add_argument("--rounds", type=int, default=3, help="best of N")
    args = ap.parse_args()

    data = make_lines(args.records, args.quoted)
    print(
        f"{args.records} d records, {len(data) / args.records:.0f} bytes a line, "
        f"{args.quoted:.0%} quoted, {args.chunk}-byte chunks, best of {args.rounds}"
    )
    gc.collect()
    results = {}
    for name, fn in (
        ("csv.reader baseline", lambda: bench_baseline(data)),
        ("AccountingParser", lambda: bench_parser(data, args.chunk, facts=False)),
        ("AccountingParser + delivery_facts", lambda: bench_parser(data, args.chunk, True)),
    ):
        best = min(fn()[1] for _ in range(args.rounds))
        n = fn()[0]
        assert n == args.records, (name, n)
        results[name] = args.records / best
        print(f"{name:36s} {results[name]:>10,.0f} records/s")
    base = results["csv.reader baseline"]
    for name, rate in results.items():
        if name != "csv.reader baseline":
            print(f"ratio {name} / csv.reader: {rate / base:.2f}")


if __name__ == "__main__":
    main()
