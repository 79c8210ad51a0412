"""The wrapper on real sockets: smtplib (in a thread) -> proxy -> the sink, on loopback."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl as stdlib_ssl
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, ssl
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sparkytwist.metrics import Metrics
from sparkytwist.smtp import tls
from sparkytwist.smtp.server import ProxyConfig, WrapperFactory
from sparkytwist.smtp.stats import WrapperStats
from sparkytwist.token import TokenCodec, new_key_spec
from tests.support.ports import free_port
from tests.support.processes import twistd
from tests.support.smtp_sink import SinkFactory, make_certificate, server_tls

BASE = "http://track.test"
TOKEN = re.compile(re.escape(BASE) + r"/([A-Za-z0-9_-]+)")


def html_email(to: str = "fred@example.org") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = to
    msg["Subject"] = "hello"
    msg.set_content("plain")
    msg.add_alternative('<html><body><a href="https://example.com/a">a</a> '
                        '<a href="https://example.com/b">b</a></body></html>', subtype="html")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def no_verify() -> stdlib_ssl.SSLContext:
    context = stdlib_ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = stdlib_ssl.CERT_NONE
    return context


def read_replies(sock: Any, count: int) -> list[bytes]:
    """Read until ``count`` final reply lines arrived (5 s at most)."""
    sock.settimeout(5)
    data = b""
    while len(re.findall(rb"(?m)^\d{3} .*\r\n", data)) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return re.findall(rb"(?m)^(\d{3}) .*\r\n", data)


class ProxyOnLoopback(TestCase):
    """A sink and a proxy listening on free loopback ports."""

    def start(self, sink: SinkFactory | None = None, **config: Any) -> None:
        self.sink = sink or SinkFactory()
        sink_port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(sink_port.stopListening)
        self.codec = TokenCodec.from_specs([new_key_spec()])
        settings: dict[str, Any] = {
            "hostname": "proxy.test", "upstream_host": "127.0.0.1",
            "upstream_port": sink_port.getHost().port, "tracking_base_url": BASE,
            "upstream_tls": "off", "upstream_timeout": 10.0}
        settings.update(config)
        self.factory = WrapperFactory(ProxyConfig(**settings), self.codec,
                                      WrapperStats(Metrics()), reactor)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.port = port.getHost().port
        self.addCleanup(port.stopListening)
        self.addCleanup(self.all_closed)

    async def all_closed(self) -> None:
        """Wait (bounded) until every proxy and sink connection has gone."""
        deadline = time.monotonic() + 5
        while (self.factory.active or any(not p.closed and p.transport and
                                          p.transport.connected  # type: ignore[attr-defined]
                                          for p in self.sink.connections)):
            if time.monotonic() > deadline:
                raise AssertionError("connections left open")
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.02, d.callback, None)  # type: ignore[attr-defined]
            await d

    def rcpts_of_tokens(self, data: bytes) -> set[tuple[str, str]]:
        decoded = data.replace(b"=\r\n", b"").replace(b"=3D", b"=").decode()
        return {(t.rcpt, t.message_id) for t in map(self.codec.decode, TOKEN.findall(decoded))}


class SmtplibTests(ProxyOnLoopback):
    async def test_starttls_both_sides_auth_and_personal_copies(self) -> None:
        certs = self.mktemp()
        cert, key = make_certificate(certs)
        sink = SinkFactory(tls=server_tls(cert, key), users={b"user": b"secret"})
        trust = ssl.Certificate.loadPEM(Path(cert).read_bytes())
        self.start(sink, server_tls=tls.server_options(cert, key), upstream_tls="required",
                   upstream_tls_options=tls.client_options("localhost", verify=True,
                                                           trust_root=trust))

        def send() -> tuple[Any, ...]:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                client.ehlo("client.test")
                before = set(client.esmtp_features)
                client.starttls(context=no_verify())
                client.ehlo("client.test")
                client.login("user", "secret")
                refused = client.sendmail("sender@example.com", ["a@example.org", "b@example.org"],
                                          html_email())
                return before, set(client.esmtp_features), refused

        before, after, refused = await deferToThread(send)
        self.assertIn("starttls", before)
        self.assertNotIn("auth", before)  # no AUTH in clear text
        self.assertIn("auth", after)
        self.assertNotIn("starttls", after)
        self.assertEqual(refused, {})
        txns = self.sink.transactions
        self.assertEqual([t.rcpt_addresses for t in txns], [["a@example.org"], ["b@example.org"]])
        for txn, rcpt in zip(txns, ["a@example.org", "b@example.org"], strict=True):
            self.assertTrue(txn.tls)
            self.assertEqual(txn.user, b"user")
            self.assertIn(b" with ESMTPSA id ", txn.data)
            found = self.rcpts_of_tokens(txn.data)
            self.assertEqual({r for r, _ in found}, {rcpt})
            (message_id,) = {m for _, m in found}
            self.assertIn(f"X-Sp-Message-Id: {message_id}".encode(), txn.data)

    async def test_failed_opportunistic_tls_goes_on_in_clear(self) -> None:
        """A handshake that fails must not stop mail when TLS is only opportunistic."""
        cert, key = make_certificate(self.mktemp())
        sink = SinkFactory(tls=server_tls(cert, key))

        def broken_tls(proto: Any, verb: bytes, line: bytes) -> bytes | None:
            if verb == b"STARTTLS":
                proto.transport.loseConnection()  # "220", then no handshake at all
                return b"220 2.0.0 Ready\r\n"
            return None

        sink.hook = broken_tls
        self.start(sink, upstream_tls="opportunistic",
                   upstream_tls_options=tls.client_options("localhost", verify=False))

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                return client.sendmail("s@example.com", ["fred@example.org"], html_email())

        self.assertEqual(await deferToThread(send), {})  # falls back in clear
        self.assertEqual(await deferToThread(send), {})  # no new attempt for a while
        self.assertEqual(len(self.sink.transactions), 2)
        self.assertFalse(any(t.tls for t in self.sink.transactions))
        self.assertEqual(self.sink.commands.count(b"STARTTLS"), 1)

    async def test_upstream_rejection_relayed_to_smtplib(self) -> None:
        sink = SinkFactory()
        sink.script[b"RCPT"] = [b"550-5.1.1 no such\r\n550 5.1.1 user here\r\n"]
        self.start(sink)

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                try:
                    client.sendmail("s@example.com", ["nobody@example.org"], html_email())
                except smtplib.SMTPRecipientsRefused as e:
                    return e.recipients
            return None

        refused = await deferToThread(send)
        self.assertEqual(refused, {"nobody@example.org": (550, b"5.1.1 no such\n5.1.1 user here")})

    async def test_upstream_dropping_mid_data(self) -> None:
        sink = SinkFactory()
        sink.drop_in_data_after = 200
        self.start(sink)

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                try:
                    client.sendmail("s@example.com", ["a@example.org"], html_email())
                except smtplib.SMTPDataError as e:
                    return e.smtp_code
            return None

        self.assertEqual(await deferToThread(send), 451)
        self.assertEqual(self.sink.delivered, 0)


class RawSocketTests(ProxyOnLoopback):
    async def test_pipelined_input_answered_in_order(self) -> None:
        self.start()
        message = html_email()

        def talk() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                replies = read_replies(s, 1)
                s.sendall(b"EHLO c\r\n")
                replies += read_replies(s, 1)
                s.sendall(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<bad@x>\r\n"
                          b"RCPT TO:<b@x>\r\nDATA\r\n")
                replies += read_replies(s, 5)
                s.sendall(message + b".\r\nNOOP\r\nQUIT\r\n")
                replies += read_replies(s, 3)
                return replies

        self.sink.hook = lambda p, verb, line: (b"550 5.1.1 unknown\r\n"
                                                if line == b"RCPT TO:<bad@x>" else None)
        replies = await deferToThread(talk)
        self.assertEqual(replies, [b"220", b"250", b"250", b"250", b"550", b"250", b"354",
                                   b"250", b"250", b"221"])
        self.assertEqual([t.rcpt_addresses for t in self.sink.transactions], [["a@x"], ["b@x"]])

    async def test_commands_pipelined_after_starttls_are_discarded(self) -> None:
        cert, key = make_certificate(self.mktemp())
        self.start(server_tls=tls.server_options(cert, key))

        def talk() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                read_replies(raw, 1)
                raw.sendall(b"EHLO c\r\n")
                read_replies(raw, 1)
                raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<evil@x>\r\n")
                replies = read_replies(raw, 1)
                with no_verify().wrap_socket(raw) as s:
                    s.sendall(b"MAIL FROM:<good@x>\r\n")
                    replies += read_replies(s, 1)
                    s.sendall(b"EHLO c\r\nMAIL FROM:<good@x>\r\nQUIT\r\n")
                    replies += read_replies(s, 3)
                return replies

        replies = await deferToThread(talk)
        self.assertEqual(replies, [b"220", b"503", b"250", b"250", b"221"])
        self.assertNotIn(b"MAIL FROM:<evil@x>", self.sink.commands)
        self.assertIn(b"MAIL FROM:<good@x>", self.sink.commands)


class TwistdTests(SynchronousTestCase):
    def run_wrapper(self, *args: str, messages: int = 1,
                    listeners: int = 1) -> tuple[bytes, int, str]:
        """twistd sparkytrack with only the wrapper, relaying ``messages`` (one connection
        each) to a sink process: (first message received, messages received, twistd log)."""
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        sink_port, wrapper_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SPARKYTWIST_", "SPARKPOST_"))}
        sink_log = open(workdir / "sink.log", "wb")  # noqa: SIM115
        self.addCleanup(sink_log.close)
        sink = subprocess.Popen(
            [os.path.join(os.path.dirname(twistd()[0]), "python"), "-c",
             "import sys; from tests.support import smtp_sink; "
             "from twisted.internet import reactor;"
             "f = smtp_sink.SinkFactory(); reactor.listenTCP(int(sys.argv[1]), f, "
             "interface='127.0.0.1');"
             "reactor.addSystemEventTrigger('before', 'shutdown', lambda: "
             "open(sys.argv[2], 'wb').write(f.transactions[0].data if f.transactions else b''));"
             "reactor.addSystemEventTrigger('before', 'shutdown', lambda: "
             "open(sys.argv[3], 'w').write(str(len(f.transactions))));"
             "reactor.run()", str(sink_port), str(workdir / "received.eml"),
             str(workdir / "count")],
            cwd=Path(__file__).parent.parent, stdout=sink_log, stderr=subprocess.STDOUT, env=env)
        self.addCleanup(lambda: sink.poll() is None and sink.kill())
        log = open(workdir / "twistd.log", "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        process = subprocess.Popen(
            twistd("sparkytrack", "--no-tracker", "--no-feeder", "--no-accounting",
                   "--admin-endpoint", f"tcp:{free_port(span=2)}:interface=127.0.0.1",
                   "--wrapper-endpoint", f"tcp:{wrapper_port}:interface=127.0.0.1",
                   "--upstream", f"127.0.0.1:{sink_port}", "--upstream-tls", "off",
                   "--tracking-base-url", BASE, *args),
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        deadline = time.monotonic() + 30
        while (workdir / "twistd.log").read_text().count("wrapper listening on") < listeners:
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError((workdir / "twistd.log").read_text())
            time.sleep(0.1)
        for _ in range(messages):
            while True:
                try:
                    client = smtplib.SMTP("127.0.0.1", wrapper_port, timeout=10)
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise AssertionError((workdir / "twistd.log").read_text()) from None
                    time.sleep(0.1)
            with client:
                self.assertEqual(client.sendmail("s@example.com", ["fred@example.org"],
                                                 html_email()), {})
        sink.terminate()
        sink.wait(10)
        process.terminate()
        process.wait(20)
        return ((workdir / "received.eml").read_bytes(), int((workdir / "count").read_text()),
                (workdir / "twistd.log").read_text())

    def test_sparkytrack_wrapper_relays_a_tracked_message(self) -> None:
        """twistd sparkytrack with only the wrapper: a message reaches a sink, rewritten."""
        received, _, log = self.run_wrapper()
        self.assertRegex(received, rb"X-Sp-Message-Id: [0-9a-f]{20}\r\n")
        self.assertIn(BASE.encode() + b"/", received.replace(b"=\r\n", b""))
        self.assertNotIn(b'href="https://example.com/a"', received)
        self.assertIn("wrapper listening on", log)

    def test_two_wrapper_processes_share_the_port(self) -> None:
        received, count, log = self.run_wrapper("--wrapper-workers", "2", messages=12,
                                                listeners=2)
        self.assertEqual(count, 12, log)
        self.assertIn(BASE.encode() + b"/", received.replace(b"=\r\n", b""))
        self.assertIn("wrapper worker", log)
        self.assertEqual(log.count("(SO_REUSEPORT, pid"), 2, log)
        self.assertIn("wrapper workers stopped", log)
