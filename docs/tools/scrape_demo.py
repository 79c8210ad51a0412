# ruff: noqa: S311, S603, S310
"""Run a real ``twistd sparkytrack`` under demo traffic and record ``/metrics`` every second.

The scrapes feed ``docs/tools/render_dashboard.py``, which draws the Grafana dashboard
(``etc/grafana/sparkytwist.json``) from them: a picture of the dashboard from a real run,
without a Grafana. Everything listens on loopback; nothing is left running afterwards.

    .venv/bin/python docs/tools/scrape_demo.py --seconds 60 --out docs/img/dashboard-scrapes.txt.gz

Two processes are started besides this one:

* ``scrape_demo.py mta``: the stand-in for PowerMTA and SparkPost. An SMTP sink (from
  ``tests/support/smtp_sink.py``) that keeps each message in a spool directory and appends
  PMTA accounting records (``t``, ``d``, ``b``) to a CSV file, plus the fake Ingest API
  (``tests/support/fake_ingest.py``). Lines on its stdin script faults (Ingest answers,
  malformed accounting lines); it stops when its stdin closes.
* ``twistd -n --pidfile= sparkytrack`` in a temporary directory, with its embedded Redis,
  ``--upstream`` at the sink, the feeder at the fake Ingest, and
  ``--accounting-command "tail -F -n +1 acct.csv"``.

This process sends mail through the wrapper (smtplib), then plays the recipients: it reads
the tracked messages from the spool and fetches their pixels and links like mail clients,
Gmail's image proxy, link scanners (HEAD) and a flooding client do, with a few forged tokens.
Halfway it stops the embedded redis-server for a few seconds (SIGSTOP/SIGCONT) to show
an outage. The traffic follows a fixed seed, so runs look alike.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import gzip
import heapq
import http.client
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
ACCT_FIELDS = (
    "type,timeLogged,orig,rcpt,dsnAction,dsnStatus,dlvSourceIp,vmtaPool,jobId,"
    "header_x-sp-message-id,header_x-job"
)

BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (Linux; Android 14; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36",
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)",
)
GMAIL_PROXY = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
               "(via ggpht.com GoogleImageProxy)")
APPLE_MPP = "Mozilla/5.0"
SCANNER = "Mozilla/5.0 (compatible; Proofpoint URL Defense)"
CRAWLER = "python-requests/2.31.0"


# -- the PowerMTA + SparkPost stand-in (subcommand "mta") ------------------------------


def run_mta(spool: Path, acct: Path) -> None:
    """SMTP sink + fake Ingest on free loopback ports; prints {"smtp": p, "ingest": p}."""
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver
    from twisted.web.server import Site

    from tests.support.fake_ingest import FakeIngest
    from tests.support.smtp_sink import SinkFactory, SinkProtocol, Transaction

    spool.mkdir(parents=True, exist_ok=True)
    acct_file = acct.open("a", encoding="utf-8", newline="")
    acct_file.write(ACCT_FIELDS + "\r\n")
    acct_file.flush()
    rng = random.Random(7)
    counter = iter(range(1, 10**9))

    def pmta_time() -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S+0000", time.gmtime())

    def acct_line(kind: str, rcpt: str, msg_id: str, job: str, status: str) -> str:
        action = {"d": "relayed", "b": "failed", "t": "delayed"}[kind]
        return (f"{kind},{pmta_time()},bounces@news.example.com,{rcpt},{action},{status},"
                f"198.51.100.{rng.randint(2, 9)},pool-{rng.choice('ab')},{job},{msg_id},"
                f"{job}\r\n")

    class DemoSinkProtocol(SinkProtocol):
        def end_of_data(self, stuffed: bytes) -> None:
            txn = self.txn
            if txn is not None and any(b"@greylist." in line for line in txn.rcpts):
                self.txn = None
                self.send(b"451 4.7.1 Greylisted, try again later\r\n")
                return
            super().end_of_data(stuffed)

    class DemoSink(SinkFactory):
        def buildProtocol(self, addr: Any) -> SinkProtocol:
            proto = DemoSinkProtocol(self)
            proto.factory = self
            return proto

        def delivered_one(self, txn: Transaction) -> None:
            super().delivered_one(txn)
            number = next(counter)
            tmp = spool / f".{number}.tmp"
            rcpt_line = ", ".join(txn.rcpt_addresses).encode()
            tmp.write_bytes(b"X-Demo-Rcpt: " + rcpt_line + b"\r\n" + txn.data)
            tmp.rename(spool / f"{number:06d}.eml")
            head = txn.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
            found = re.search(r"^X-Sp-Message-Id:\s*(\S+)", head, re.I | re.M)
            msg_id = found.group(1) if found else ""
            job = "spring-sale" if number % 3 else "newsletter-42"
            for rcpt in txn.rcpt_addresses:
                if rng.random() < 0.1:  # the remote MX deferred it once first
                    acct_file.write(acct_line("t", rcpt, msg_id, job, "4.2.0 (deferred)"))
                if "@bounce." in rcpt:
                    acct_file.write(acct_line("b", rcpt, msg_id, job, "5.1.1 (bad mailbox)"))
                else:
                    acct_file.write(acct_line("d", rcpt, msg_id, job, "2.0.0 (success)"))
            acct_file.flush()

    fake = FakeIngest(reactor, "test-ingest-key")
    site = Site(fake)
    site.displayTracebacks = False
    ingest_port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    smtp_port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, DemoSink(record=False), backlog=256, interface="127.0.0.1")

    class Control(LineReceiver):
        """``ingest STATUS [RETRY_AFTER]``, ``garbage``, ``no-id``; EOF stops everything."""

        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            words = line.decode().split()
            if not words:
                return
            if words[0] == "ingest":
                headers = {"Retry-After": words[2]} if len(words) > 2 else None
                fake.enqueue(int(words[1]), headers)
            elif words[0] == "garbage":  # what a broken pipe or a bad edit looks like
                acct_file.write('d,"a quote, then"x,c,d,e,f,g,h,i,j,k\r\n')
                acct_file.write("d,only,three\r\n" * 2)
                acct_file.write("d,2024-01-01 00:00:00+0000,a\rb,c,d,e,f,g,h,i,j\r\n" * 3)
                acct_file.flush()
            elif words[0] == "no-id":  # mail that went to PMTA without the wrapper
                for _ in range(5):
                    acct_file.write(acct_line("d", "direct@example.org", "", "direct",
                                              "2.0.0 (success)"))
                acct_file.flush()

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    stdio.StandardIO(Control())
    print(json.dumps({"smtp": smtp_port.getHost().port,
                      "ingest": ingest_port.getHost().port}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    acct_file.close()
    sys.stderr.write(f"mta: {len(fake.events)} events in {len(fake.batches)} batches "
                     f"accepted, {len(fake.requests)} requests, "
                     f"{len(fake.violations)} contract violations\n")
    for violation in fake.violations[:5]:
        sys.stderr.write(f"mta: violation: {violation[:300]}\n")


# -- helpers -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of every live process below ``root`` (from /proc)."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append((int(entry.name), name))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, name in parents.get(todo.pop(), []):
            found[pid] = name
            todo.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def fetch(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Scraper(threading.Thread):
    """GET /metrics (and /healthz) once a second, appended to ``out`` as one block each."""

    def __init__(self, admin: str, out: IO[str]) -> None:
        super().__init__(daemon=True)
        self.admin, self.out = admin, out
        self.stopping = threading.Event()
        self.count = 0

        self.health = 0

    def probe(self) -> None:
        """/healthz in its own thread: it waits up to redis_timeout while Redis is down."""
        while not self.stopping.is_set():
            self.health = fetch(self.admin + "/healthz", timeout=5)[0]
            self.stopping.wait(1.0)

    def run(self) -> None:
        threading.Thread(target=self.probe, daemon=True).start()
        next_at = time.monotonic()
        while not self.stopping.is_set():
            now = time.time()
            status, body = fetch(self.admin + "/metrics", timeout=0.9)
            if status == 200:
                self.out.write(f"# SCRAPE {now:.3f} healthz={self.health}\n")
                self.out.write(body.decode())
                self.out.write("# END\n")
                self.count += 1
            next_at += 1.0
            self.stopping.wait(max(0.0, next_at - time.monotonic()))


# -- the traffic -----------------------------------------------------------------------


class Traffic:
    """A clock-driven schedule of mail sends and recipient behaviour, all bounded."""

    def __init__(self, wrapper: int, tracker: int, spool: Path, control: IO[bytes], *,
                 redis_pid: int | None, seconds: float, honeypots: bool = False) -> None:
        self.wrapper, self.tracker, self.spool = wrapper, tracker, spool
        self.control, self.redis_pid, self.seconds = control, redis_pid, seconds
        self.honeypots = honeypots  # off by default: see docs/monitoring.md
        self.rng = random.Random(42)
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.seen: set[str] = set()
        self.pixels: list[str] = []
        self.stats: dict[str, int] = {}
        self.start = 0.0

    def at(self, t: float, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.start + t, self.seq, action))

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    def say(self, line: str) -> None:
        self.control.write(line.encode() + b"\n")
        self.control.flush()

    def run(self) -> dict[str, int]:
        self.start = time.monotonic()
        s = self.seconds
        for second in range(int(s) - 5):  # stop mailing 5 s early: the last opens still come
            self.at(second + 0.1, lambda second=second: self.send_batch(second))
        for t in (i * 0.5 for i in range(int(s * 2))):
            self.at(t + 0.3, self.collect)
        # Faults come twice: a labelled series that appears mid-run has no rate at first
        # (Prometheus needs two samples), so the second time is the one the graphs show.
        self.at(0.10 * s, lambda: self.say("ingest 500"))
        self.at(0.12 * s, lambda: self.send_special("too-big"))
        self.at(0.25 * s, lambda: self.say("garbage"))
        self.at(0.30 * s, lambda: self.say("no-id"))
        self.at(0.50 * s, lambda: self.say("ingest 400"))
        self.at(0.38 * s, lambda: (self.say("ingest 500"), self.say("ingest 503")))
        self.at(0.45 * s, lambda: self.redis_signal(signal.SIGSTOP))
        self.at(0.45 * s + 5, lambda: self.redis_signal(signal.SIGCONT))
        self.at(0.55 * s, lambda: self.send_special("too-big"))
        for i in range(8):
            self.at(0.60 * s + i, self.flood)
        self.at(0.68 * s, lambda: self.say("ingest 429 3"))
        self.at(0.72 * s, lambda: self.say("garbage"))
        self.at(0.76 * s, lambda: self.say("ingest 429 6"))
        self.at(0.65 * s, lambda: self.say("no-id"))
        self.at(0.88 * s, lambda: self.say("ingest 400"))
        for i in range(int(s // 3)):
            self.at(self.rng.uniform(0, s), self.forged)
            if i % 2:
                self.at(self.rng.uniform(2, s - 2), lambda: self.send_special("greylist"))
        deadline = self.start + s
        try:
            while self.queue and time.monotonic() < deadline:
                when, _, action = heapq.heappop(self.queue)
                delay = when - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if when < deadline:
                    action()
        finally:
            self.redis_signal(signal.SIGCONT)  # never leave it stopped
        return self.stats

    # mail

    def message(self, rcpts: list[str], n: int, pad: int = 0) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = "Shop <news@news.example.com>"
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = f"Spring sale #{n}"
        msg["X-Job"] = "spring-sale"
        msg.set_content("Our spring sale: https://shop.example.com/sale\n")
        links = "".join(
            f'<p><a href="https://shop.example.com/{p}?utm_source=mail&amp;n={n}">{p}</a></p>'
            for p in ("sale", "shoes", "bags", "unsubscribe"))
        filler = "<p>" + "x" * 70 + "</p>\n"
        msg.add_alternative(
            f"<html><body><h1>Spring sale</h1>{links}{filler * pad}"
            f'<img src="https://shop.example.com/logo.png" alt="logo"></body></html>',
            subtype="html")
        return msg

    def recipient(self) -> str:
        domain = self.rng.choices(
            ("gmail.example", "icloud.example", "corp.example", "bounce.example", "mail.example"),
            (35, 20, 15, 3, 27))[0]
        return f"user{self.rng.randint(1, 99999)}@{domain}"

    def send_batch(self, second: int) -> None:
        """One SMTP session a second with a varying number of messages (a generator)."""
        wave = 4 + 3 * ((second // 10) % 3)  # 4, 7, 10 messages a second by turns
        try:
            with smtplib.SMTP("127.0.0.1", self.wrapper, timeout=10) as smtp:
                for i in range(wave):
                    rcpts = [self.recipient() for _ in range(2 if i % 4 == 0 else 1)]
                    smtp.send_message(self.message(rcpts, second * 100 + i),
                                      from_addr="bounces@news.example.com", to_addrs=rcpts)
                    self.count("messages sent")
        except smtplib.SMTPException as e:
            self.count(f"smtp error {type(e).__name__}")
        except OSError:
            self.count("smtp connection failed")

    def send_special(self, kind: str) -> None:
        rcpts = ["someone@greylist.example"] if kind == "greylist" else [self.recipient()]
        msg = self.message(rcpts, 0, pad=4000 if kind == "too-big" else 0)
        try:
            with smtplib.SMTP("127.0.0.1", self.wrapper, timeout=10) as smtp:
                smtp.ehlo()
                # Without SIZE= on MAIL the wrapper finds out after DATA (outcome too_big);
                # with it, MAIL gets 552 and no metric counts it (see docs/monitoring.md).
                smtp.esmtp_features.pop("size", None)
                smtp.send_message(msg, from_addr="bounces@news.example.com", to_addrs=rcpts)
        except smtplib.SMTPException:
            self.count(f"{kind} refused (expected)")
        except OSError:
            self.count("smtp connection failed")

    # recipients

    def collect(self) -> None:
        """New messages at the sink become opens and clicks, seconds to tens of seconds later."""
        base = f"http://127.0.0.1:{self.tracker}/"
        for path in sorted(self.spool.glob("*.eml")):
            if path.name in self.seen:
                continue
            self.seen.add(path.name)
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            body = msg.get_body(("html",))
            if body is None:
                continue
            html = body.get_content()
            rcpt = str(msg.get("X-Demo-Rcpt", ""))
            pixels = re.findall(r'<img[^>]+src="(' + re.escape(base) + r'[^"]+)"', html)
            honeypots, clicks = [], []
            for tag in re.findall(r"<a\b[^>]*>", html):
                href = re.search(r'href="(' + re.escape(base) + r'[^"]+)"', tag)
                if href:  # the honeypot link is hidden from people and keyboards
                    hidden = "aria-hidden" in tag or 'tabindex="-1"' in tag
                    (honeypots if hidden else clicks).append(href.group(1))
            self.pixels.extend(pixels)
            self.plan(rcpt, pixels, clicks, honeypots)

    def plan(self, rcpt: str, pixels: list[str], clicks: list[str],
             honeypots: list[str]) -> None:
        rng = self.rng
        soon = 1.0 + time.monotonic() - self.start
        if "@corp." in rcpt and rng.random() < 0.6:  # a link scanner checks every link first
            for url in clicks:
                self.at(soon + rng.uniform(0, 1), lambda u=url: self.hit(u, SCANNER, head=True))
            if honeypots and self.honeypots and rng.random() < 0.5:
                self.at(soon + 1.5, lambda u=honeypots[0]: self.hit(u, CRAWLER))
        if "@gmail." in rcpt:
            agent = GMAIL_PROXY
        elif "@icloud." in rcpt and rng.random() < 0.7:
            agent = APPLE_MPP
            soon -= 0.5  # MPP loads the pictures on delivery, whether read or not
        else:
            agent = rng.choice(BROWSERS)
        if agent != APPLE_MPP and rng.random() > 0.55:
            return  # never opened (within the demo)
        opened = soon + (rng.expovariate(1 / 6) if agent != APPLE_MPP else 0.5)
        for url in pixels:
            self.at(opened, lambda u=url, a=agent: self.hit(u, a))
        if agent == GMAIL_PROXY and rng.random() < 0.3:  # opened again later: proxy cache miss
            self.at(opened + rng.uniform(5, 15), lambda u=pixels[-1]: self.hit(u, GMAIL_PROXY))
        if clicks and rng.random() < 0.35:
            browser = rng.choice(BROWSERS)
            url = rng.choice(clicks[:-1] or clicks)
            self.at(opened + rng.uniform(1, 8), lambda: self.hit(url, browser))

    def client_ip(self, agent: str) -> str:
        if agent == GMAIL_PROXY:
            return f"66.249.84.{self.rng.randint(1, 254)}"
        if agent == APPLE_MPP:
            return f"17.58.{self.rng.randint(0, 255)}.{self.rng.randint(1, 254)}"
        return f"203.0.113.{self.rng.randint(1, 254)}"

    def hit(self, url: str, agent: str, *, head: bool = False, ip: str = "") -> None:
        path = url.split("/", 3)[3]
        conn = http.client.HTTPConnection("127.0.0.1", self.tracker, timeout=5)
        try:
            conn.request("HEAD" if head else "GET", "/" + path, headers={
                "User-Agent": agent, "X-Forwarded-For": ip or self.client_ip(agent)})
            response = conn.getresponse()
            response.read()
            self.count(f"http {response.status}")
        except OSError:
            self.count("http failed")
        finally:
            conn.close()

    def forged(self) -> None:
        """What a scanner guessing tokens, or a truncated link, sends."""
        token = "".join(self.rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_")
                        for _ in range(self.rng.choice((20, 64, 90))))
        self.hit(f"http://127.0.0.1:{self.tracker}/{token}", self.rng.choice(BROWSERS))

    def flood(self) -> None:
        """One client reloading an open pixel, 30 times a second: over the per-IP limit."""
        if not self.pixels:
            return
        for _ in range(30):
            self.hit(self.pixels[-1], BROWSERS[0], ip="203.0.113.66")

    def redis_signal(self, signum: int) -> None:
        if self.redis_pid is not None and alive(self.redis_pid):
            os.kill(self.redis_pid, signum)


# -- the run ---------------------------------------------------------------------------


@contextlib.contextmanager
def started(args: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child that is stopped (SIGTERM, then SIGKILL after 30 s) whatever happens."""
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def recorded_by() -> str:
    """This command line as run from the repository, for the picture's caption."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    script = Path(sys.argv[0]).resolve().relative_to(REPO)
    return " ".join([str(python), str(script), *sys.argv[1:]])


def main_run(opts: argparse.Namespace) -> int:
    python = Path(sys.executable)
    twistd = python.parent / "twistd"
    work = Path(tempfile.mkdtemp(prefix="sparky-demo-"))
    spool, acct = work / "spool", work / "acct.csv"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    leftovers: dict[int, str] = {}
    try:
        with started([str(python), __file__, "mta", "--spool", str(spool), "--acct", str(acct)],
                     cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as mta:
            assert mta.stdout is not None and mta.stdin is not None
            ports = json.loads(mta.stdout.readline())
            wrapper, tracker, admin = free_port(), free_port(), free_port()
            log = (work / "twistd.log").open("wb")
            args = [
                str(twistd), "-n", "--pidfile=", "sparkytrack",
                "--wrapper-endpoint", f"tcp:{wrapper}:interface=127.0.0.1",
                "--tracker-endpoint", f"tcp:{tracker}:interface=127.0.0.1",
                "--admin-endpoint", f"tcp:{admin}:interface=127.0.0.1",
                "--tracking-base-url", f"http://127.0.0.1:{tracker}",
                "--upstream", f"127.0.0.1:{ports['smtp']}", "--upstream-tls", "off",
                "--hostname", "wrapper.demo.example",
                "--max-message-size", "200kb",
                "--sparkpost-host", f"http://127.0.0.1:{ports['ingest']}",
                "--sparkpost-api-key", "test-ingest-key", "--batch-max-age", "2s",
                "--accounting-command", f"tail -F -n +1 {acct}",
                "--per-ip-rate", "10", "--per-ip-burst", "20", "--redis-timeout", "1s",
            ]
            with started(args, cwd=work, stdout=log, stderr=subprocess.STDOUT) as twist:
                admin_url = f"http://127.0.0.1:{admin}"
                for _ in range(300):  # up to 30 s for Redis, keys and ports
                    if fetch(admin_url + "/healthz", timeout=0.5)[0] == 200:
                        break
                    if twist.poll() is not None:
                        raise SystemExit(f"twistd exited; see {work / 'twistd.log'}")
                    time.sleep(0.1)
                else:
                    raise SystemExit(f"twistd never became healthy; see {work / 'twistd.log'}")
                children = descendants(twist.pid)
                redis = next((p for p, n in children.items() if n.startswith("redis-serv")), None)
                opener = gzip.open if str(opts.out).endswith(".gz") else open
                with opener(opts.out, "wt", encoding="utf-8") as out:
                    out.write(f"# RECORDED-BY {recorded_by()}\n")
                    scraper = Scraper(admin_url, out)
                    scraper.start()
                    traffic = Traffic(wrapper, tracker, spool, mta.stdin, redis_pid=redis,
                                      seconds=opts.seconds, honeypots=opts.honeypots)
                    stats = traffic.run()
                    time.sleep(3)  # the last batches reach Ingest
                    scraper.stopping.set()
                    scraper.join()
                children.update(descendants(twist.pid))
            mta.stdin.close()
            mta.wait(15)
        for pid, name in children.items():
            if alive(pid):
                leftovers[pid] = name
                os.kill(pid, signal.SIGKILL)
        log.close()
        print(f"{scraper.count} scrapes -> {opts.out}")
        print("traffic:", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
        ended = ("stopped by SIGTERM" if twist.returncode == -signal.SIGTERM
                 else f"exit code {twist.returncode}")
        print(f"twistd {ended}; processes left behind: {leftovers or 'none'}")
        tail = (work / "twistd.log").read_text(errors="replace").splitlines()
        print("twistd log (last lines):\n  " + "\n  ".join(tail[-8:]))
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("kept", work, flush=True)
    return 1 if leftovers else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    mta = sub.add_parser("mta", help="internal: the PowerMTA + SparkPost stand-in")
    mta.add_argument("--spool", type=Path, required=True)
    mta.add_argument("--acct", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", default=str(REPO / "docs/img/dashboard-scrapes.txt.gz"))
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--honeypots", action="store_true",
                        help="let crawlers follow the hidden honeypot links too")
    opts = parser.parse_args()
    if opts.command == "mta":
        run_mta(opts.spool, opts.acct)
        return 0
    return main_run(opts)


if __name__ == "__main__":
    sys.exit(main())
