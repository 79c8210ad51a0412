"""Wrapper throughput: smtplib clients -> the ESMTP proxy -> a sink, messages per second.

    .venv/bin/python bench/wrapper.py [--seconds 5] [--clients 12] [--proxies 2]

(b) through the proxy with tracking, (c) the same proxy with ``X-Sparky-Track:
none`` (parse, id and Received header only), (d) the clients straight to the sink.
The proxies are separate processes, each on its own port (clients are spread
over them); the sink is one more process. Everything shares this machine's
cores, so the numbers are a floor for a host where PMTA is elsewhere.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_message(track: str | None = None, links: int = 40, size: int = 40_000) -> bytes:
    """A ~40 KB multipart/alternative newsletter, HTML quoted-printable, ``links`` links."""
    import quopri

    rows = [
        (f'<tr><td style="padding:8px;font-family:Arial,sans-serif;font-size:14px">'
            f'<a href="https://www.example.com/products/item-{i}?utm_source=newsletter&amp;'
            f'utm_medium=email&amp;utm_campaign=2024-06&amp;pos={i}" style="color:#336699">'
            f'Product number {i}: a short description of why you want it</a></td></tr>\n')
        for i in range(links)]
    filler = ('<p style="margin:0 0 12px 0;color:#333333">Lorem ipsum dolor sit amet, '
              'consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.</p>\n')
    html = ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>News</title></head>'
            '<body style="margin:0;padding:0"><table width="100%">\n' + "".join(rows)
            + "</table>\n")
    while len(html) < size - 2000:
        html += filler
    html += "</body></html>\n"
    qp = quopri.encodestring(html.encode(), quotetabs=False).replace(b"\n", b"\r\n")
    headers = (b"From: News <news@example.com>\r\nTo: <fred@example.org>\r\n"
               b"Subject: Weekly news\r\nMIME-Version: 1.0\r\n")
    if track:
        headers += b"X-Sparky-Track: " + track.encode() + b"\r\n"
    boundary = b"----=_b_4242"
    return (headers + b'Content-Type: multipart/alternative; boundary="' + boundary + b'"\r\n'
            b"\r\n--" + boundary + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            b"See the HTML part.\r\n--" + boundary
            + b"\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp + b"\r\n--"
            + boundary + b"--\r\n")


def serve(port: int, upstream_port: int) -> None:
    """One proxy process (what ``twistd sparkytrack`` runs, without Redis and admin)."""
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import epollreactor

        epollreactor.install()
    from twisted.internet import reactor

    from sparkytwist.metrics import Metrics
    from sparkytwist.smtp.server import ProxyConfig, WrapperFactory
    from sparkytwist.smtp.stats import WrapperStats
    from sparkytwist.token import TokenCodec, new_key_spec

    config = ProxyConfig(hostname="bench.test", upstream_host="127.0.0.1",
                         upstream_port=upstream_port, upstream_tls="off",
                         tracking_base_url="https://t.example.com")
    factory = WrapperFactory(config, TokenCodec.from_specs([new_key_spec()]),
                             WrapperStats(Metrics()), reactor)
    reactor.listenTCP(port, factory, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def client(port: int, message: bytes, deadline: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    sent = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("bench.client")
        while time.monotonic() < deadline:
            smtp.sendmail("news@example.com", ["fred@example.org"], message)
            sent += 1
    out.put(sent)


def run(ports: list[int], message: bytes, clients: int, seconds: float) -> float:
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start = time.monotonic() + 0.5
    deadline = start + seconds
    procs = [multiprocessing.Process(target=client,
                                     args=(ports[i % len(ports)], message, deadline, out))
             for i in range(clients)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / (time.monotonic() - start)


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise SystemExit(f"nothing listening on {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--proxies", type=int, default=2)
    parser.add_argument("--serve", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sink_port = free_port()
    children = [subprocess.Popen([sys.executable, "-m", "tests.support.smtp_sink",
                                  str(sink_port)], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL)]
    proxy_ports = [free_port() for _ in range(args.proxies)]
    children += [subprocess.Popen([sys.executable, __file__, "--serve", str(p), str(sink_port)],
                                  env=env) for p in proxy_ports]
    try:
        for port in [sink_port, *proxy_ports]:
            wait_listening(port)
        tracked, untracked = make_message(), make_message("none")
        print(f"message: {len(tracked)} bytes, 40 links, quoted-printable; "
              f"{args.clients} clients, {args.proxies} proxy processes, {args.seconds:g} s each")
        b = run(proxy_ports, tracked, args.clients, args.seconds)
        print(f"(b) proxy, tracking on : {b:8.1f} msg/s  = {b * 3600 / 1e6:5.2f} M/hour")
        c = run(proxy_ports, untracked, args.clients, args.seconds)
        print(f"(c) proxy, tracking off: {c:8.1f} msg/s  = {c * 3600 / 1e6:5.2f} M/hour")
        d = run([sink_port], tracked, args.clients, args.seconds)
        print(f"(d) straight to sink   : {d:8.1f} msg/s  = {d * 3600 / 1e6:5.2f} M/hour")
        print(f"b/c = {b / c:.2f}   b/d = {b / d:.2f}")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)


if __name__ == "__main__":
    main()
