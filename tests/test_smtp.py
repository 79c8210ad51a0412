"""The wrapper's SMTP side, in memory: a client, the proxy and the real sink over iosim."""

from __future__ import annotations

import quopri
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.metrics import Metrics
from sparkytwist.smtp.replies import Reply
from sparkytwist.smtp.server import ProxyConfig, SMTPProxy, WrapperFactory
from sparkytwist.smtp.stats import WrapperStats
from sparkytwist.smtp.upstream import UpstreamClient, UpstreamRefused
from sparkytwist.token import TokenCodec, new_key_spec
from tests.support.smtp_sink import SinkFactory

NOW = 1_700_000_000.0
BASE = "http://track.test"
TOKEN = re.compile(re.escape(BASE) + r"/([A-Za-z0-9_-]+)")


def html_message(*, headers: bytes = b"", links: int = 2, extra: bytes = b"") -> bytes:
    body = b"".join(b'<a href="https://example.com/p/%d">link %d</a><br>\r\n' % (i, i)
                    for i in range(links))
    return (b"From: <sender@example.com>\r\nTo: <fred@example.org>\r\nSubject: hi\r\n"
            + headers + b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            b"<html><body>\r\n" + body + extra + b"</body></html>\r\n")


def stuffed(message: bytes) -> bytes:
    """What a client sends after DATA: dot-stuffed, ended by CRLF.CRLF."""
    data = message.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


class RawClient(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class Harness:
    """A client, the proxy and a sink, connected in memory; ``pump`` moves the bytes."""

    def __init__(self, sink: SinkFactory | None = None, *, up: bool = True,
                 **config: Any) -> None:
        self.clock = Clock()
        self.sink = sink or SinkFactory()
        self.codec = TokenCodec.from_specs([new_key_spec()])
        self.metrics = Metrics()
        self.pumps: list[iosim.IOPump] = []
        self.up = up
        settings: dict[str, Any] = {
            "hostname": "proxy.test", "upstream_host": "127.0.0.1", "upstream_port": 25,
            "tracking_base_url": BASE, "upstream_tls": "off"}
        settings.update(config)
        self.config = ProxyConfig(**settings)
        self.factory = WrapperFactory(
            self.config, self.codec, WrapperStats(self.metrics), self.clock,
            connect_upstream=self.connect_upstream, now=lambda: NOW)
        self.upstreams: list[UpstreamClient] = []

    def connect_upstream(self) -> defer.Deferred[UpstreamClient]:
        if not self.up:
            return defer.fail(ConnectionRefusedError("nobody home"))
        client = UpstreamClient(self.clock, self.config.upstream_timeout)
        server = self.sink.buildProtocol(None)
        self.pumps.append(iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
            greet=False, clock=self.clock))
        self.upstreams.append(client)

        def greeted(reply: Reply) -> UpstreamClient:
            if reply.code != 220:
                raise UpstreamRefused(reply)
            return client

        return client.greeting.addCallback(greeted)

    def connect(self) -> RawClient:
        proxy = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        client = RawClient()
        server_transport = iosim.FakeTransport(
            proxy, isServer=True, peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.pumps.append(iosim.connect(
            proxy, server_transport, client, iosim.makeFakeClient(client), greet=False,
            clock=self.clock))
        self.client, self.proxy = client, proxy
        self.pump()
        return client

    def pump(self) -> None:
        for _ in range(10_000):
            moved = False
            for p in list(self.pumps):
                moved = p.pump(advanceClock=False) or moved
            self.clock.advance(0)
            if not moved:
                return
        raise AssertionError("still pumping")

    def send(self, data: bytes) -> bytes:
        """Send data; the client's new input."""
        before = len(self.client.received)
        assert self.client.transport is not None
        self.client.transport.write(data)
        self.pump()
        return self.client.received[before:]

    def session(self, *lines: bytes) -> bytes:
        return self.send(b"".join(line + b"\r\n" for line in lines))

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"sparkytwist_{name}_total", labels)
        return value or 0.0


def codes(replies: bytes) -> list[bytes]:
    """The code of each final reply line, in order."""
    return [line[:3] for line in replies.split(b"\r\n") if line[3:4] in (b" ", b"")
            and line]


class GreetingAndEhloTests(SynchronousTestCase):
    def test_greets_then_filters_the_upstream_capabilities(self) -> None:
        h = Harness(max_message_size=1_000_000)
        client = h.connect()
        self.assertEqual(client.received, b"220 proxy.test ESMTP sparkytwist\r\n")
        reply = h.session(b"EHLO client.test")
        lines = reply.split(b"\r\n")[:-1]
        self.assertEqual(lines[0], b"250-proxy.test Hello client.test")
        keywords = [line[4:] for line in lines[1:]]
        self.assertIn(b"PIPELINING", keywords)
        self.assertIn(b"SIZE 1000000", keywords)  # ours is smaller than the sink's 100000000
        for kept in (b"8BITMIME", b"SMTPUTF8", b"DSN", b"ENHANCEDSTATUSCODES"):
            self.assertIn(kept, keywords)
        for gone in (b"CHUNKING", b"XCLIENT NAME ADDR", b"ETRN", b"STARTTLS"):
            self.assertNotIn(gone, keywords)
        self.assertTrue(lines[-1].startswith(b"250 "))
        self.assertEqual(h.sink.commands[0], b"EHLO client.test")  # the client's name relayed

    def test_upstream_size_wins_when_smaller(self) -> None:
        h = Harness(SinkFactory(extensions=(b"SIZE 5000",)))
        h.connect()
        self.assertIn(b"250 SIZE 5000\r\n", h.session(b"EHLO c"))

    def test_starttls_offered_only_with_a_certificate(self) -> None:
        h = Harness(server_tls=object())
        h.connect()
        self.assertIn(b"STARTTLS", h.session(b"EHLO c"))

    def test_auth_hidden_without_tls_unless_plain_auth_allowed(self) -> None:
        sink = SinkFactory(users={b"u": b"p"})
        h = Harness(sink, server_tls=object())
        h.connect()
        self.assertNotIn(b"AUTH", h.session(b"EHLO c"))
        self.assertEqual(h.session(b"AUTH PLAIN AHUAcA=="),
                         b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        h2 = Harness(sink, allow_plain_auth=True)
        h2.connect()
        self.assertIn(b"250 AUTH PLAIN LOGIN\r\n", h2.session(b"EHLO c"))

    def test_helo_gets_a_plain_reply(self) -> None:
        h = Harness()
        h.connect()
        self.assertEqual(h.session(b"HELO c"), b"250 proxy.test Hello c\r\n")

    def test_upstream_unreachable_gives_421_and_close(self) -> None:
        h = Harness(up=False)
        client = h.connect()
        self.assertTrue(client.received.startswith(b"421 4.4.1 "))
        self.assertTrue(client.lost)

    def test_upstream_refusing_with_554_is_relayed(self) -> None:
        sink = SinkFactory()
        sink.script[b"GREETING"] = [b"554 5.7.1 go away\r\n"]
        h = Harness(sink)
        client = h.connect()
        self.assertEqual(client.received, b"554 5.7.1 go away\r\n")
        self.assertTrue(client.lost)

    def test_extra_connections_get_421(self) -> None:
        h = Harness(max_connections=1)
        h.connect()
        extra = h.connect()
        self.assertTrue(extra.received.startswith(b"421 4.7.0 "), extra.received)
        self.assertTrue(extra.lost)
        self.assertEqual(h.counter("wrapper_connections_refused", reason="max_connections"), 1)


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.connect()
        self.h.session(b"EHLO c")

    def test_local_answers(self) -> None:
        self.assertTrue(self.h.session(b"VRFY fred").startswith(b"252 "))
        self.assertTrue(self.h.session(b"EXPN list").startswith(b"502 "))
        self.assertEqual(self.h.session(b"BDAT 10 LAST"), b"500 5.5.2 Command unrecognized\r\n")
        self.assertEqual(self.h.session(b"NOOP " + b"x" * 600),
                         b"500 5.5.2 Line too long\r\n")
        self.assertNotIn(b"VRFY fred", self.h.sink.commands)

    def test_a_line_without_end_that_never_stops_is_refused(self) -> None:
        self.assertEqual(self.h.send(b"x" * 20000), b"")
        self.assertEqual(self.h.send(b"yyy\r\nNOOP\r\n"),
                         b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n")

    def test_mail_and_rcpt_parameters_relayed_verbatim(self) -> None:
        mail = b"MAIL FROM:<s@example.com> SIZE=1234 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x1"
        rcpt = b"RCPT TO:<fred@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;fred@example.org"
        self.assertEqual(codes(self.h.session(mail, rcpt, b"DATA")), [b"250", b"250", b"354"])
        self.h.send(stuffed(html_message()))
        txn = self.h.sink.transactions[0]
        self.assertEqual((txn.mail, txn.rcpts), (mail, [rcpt]))

    def test_upstream_replies_relayed_verbatim(self) -> None:
        self.h.sink.script[b"RCPT"] = [
            b"550-5.1.1 The email account that you tried to reach does not exist.\r\n"
            b"550 5.1.1 Please check the address.\r\n",
            b"452 4.2.2 Mailbox full\r\n"]
        replies = self.h.session(b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"RCPT TO:<b@x>",
                                 b"DATA")
        self.assertEqual(replies, b"250 2.1.0 Ok\r\n"
                         b"550-5.1.1 The email account that you tried to reach does not exist."
                         b"\r\n550 5.1.1 Please check the address.\r\n"
                         b"452 4.2.2 Mailbox full\r\n"
                         b"554 5.5.1 No valid recipients\r\n")

    def test_final_data_reply_relayed_verbatim(self) -> None:
        self.h.sink.script[b"END-OF-DATA"] = [b"554-5.7.1 Rejected\r\n554 5.7.1 as spam\r\n"]
        self.h.session(b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")
        self.assertEqual(self.h.send(stuffed(html_message())),
                         b"554-5.7.1 Rejected\r\n554 5.7.1 as spam\r\n")
        self.assertEqual(self.h.counter("wrapper_messages", outcome="refused"), 1)

    def test_mail_needs_ehlo_rcpt_needs_mail(self) -> None:
        h = Harness()
        h.connect()
        self.assertEqual(h.session(b"MAIL FROM:<a@b>"), b"503 5.5.1 Send EHLO first\r\n")
        h.session(b"EHLO c")
        self.assertEqual(h.session(b"RCPT TO:<a@b>"), b"503 5.5.1 Need MAIL before RCPT\r\n")
        self.assertEqual(h.session(b"DATA"), b"503 5.5.1 Need MAIL command\r\n")

    def test_declared_size_over_the_limit_refused_at_mail(self) -> None:
        self.assertTrue(self.h.session(b"MAIL FROM:<a@b> SIZE=999999999999")
                        .startswith(b"552 5.3.4 "))

    def test_pipelined_commands_answered_in_order(self) -> None:
        replies = self.h.send(
            b"RSET\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nNOOP\r\nRCPT TO:<b@x>\r\nDATA\r\n")
        self.assertEqual(codes(replies), [b"250", b"250", b"250", b"250", b"250", b"354"])
        replies = self.h.send(stuffed(html_message()) + b"MAIL FROM:<t@x>\r\nRCPT TO:<c@x>\r\n"
                              b"DATA\r\n" + stuffed(html_message()) + b"QUIT\r\n")
        self.assertEqual(codes(replies), [b"250", b"250", b"250", b"354", b"250", b"221"])
        self.assertEqual(len(self.h.sink.transactions), 3)  # 2 copies + 1
        self.assertTrue(self.h.client.lost)

    def test_quit(self) -> None:
        self.assertEqual(self.h.session(b"QUIT"), b"221 2.0.0 proxy.test Bye\r\n")
        self.assertTrue(self.h.client.lost)
        self.assertIn(b"QUIT", self.h.sink.commands)

    def test_idle_client_gets_421(self) -> None:
        self.h.clock.advance(self.h.config.idle_timeout + 1)
        self.h.pump()
        self.assertIn(b"421 4.4.2 proxy.test Idle timeout", self.h.client.received)
        self.assertTrue(self.h.client.lost)


class DataTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.connect()
        self.h.session(b"EHLO c.test")

    def send_message(self, message: bytes, *rcpts: bytes) -> bytes:
        self.h.session(b"MAIL FROM:<s@example.com>", *(b"RCPT TO:<%s>" % r for r in rcpts),
                       b"DATA")
        return self.h.send(stuffed(message))

    def tokens(self, data: bytes) -> list[Any]:
        return [self.h.codec.decode(t) for t in TOKEN.findall(data.decode())]

    def test_message_rewritten_for_its_recipient(self) -> None:
        reply = self.send_message(html_message(links=3), b"fred@example.org")
        self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued"), reply)
        data = self.h.sink.transactions[0].data
        header_block = data.split(b"\r\n\r\n")[0]
        self.assertTrue(data.startswith(b"Received: from c.test ([192.0.2.7])\r\n\tby "
                                        b"proxy.test (sparkytwist) with ESMTP id "), data[:200])
        self.assertIn(b"\r\n\tfor <fred@example.org>; Tue, 14 Nov 2023 22:13:20 +0000\r\n",
                      header_block)
        message_id = re.search(rb"X-Sp-Message-Id: ([0-9a-f]{20})\r\n", header_block)
        assert message_id is not None
        self.assertTrue(message_id.group(1).startswith(b"6553f100"))  # NOW in hex
        tokens = self.tokens(data)
        clicks = [t for t in tokens if t.action == "c"]
        self.assertEqual([t.url for t in clicks],
                         [f"https://example.com/p/{i}" for i in range(3)])
        self.assertEqual({(t.message_id, t.rcpt) for t in tokens},
                         {(message_id.group(1).decode(), "fred@example.org")})
        self.assertLessEqual({"i", "o"}, {t.action for t in tokens})  # the two pixels
        self.assertEqual(self.h.counter("wrapper_links_rewritten"), 3)
        self.assertEqual(self.h.counter("wrapper_pixels"), 2)
        self.assertEqual(self.h.counter("wrapper_messages", outcome="relayed"), 1)

    def test_dot_stuffing_both_ways(self) -> None:
        message = html_message(extra=b".leading dot\r\n..two\r\n.\r\n")
        self.send_message(message, b"a@x")
        data = self.h.sink.transactions[0].data
        self.assertIn(b"\r\n.leading dot\r\n..two\r\n.\r\n", data)

    def test_existing_message_id_kept_for_one_recipient(self) -> None:
        message = html_message(headers=b"X-Sp-Message-Id: 0123456789abcdef0123\r\n")
        self.send_message(message, b"a@x")
        data = self.h.sink.transactions[0].data
        self.assertEqual(data.count(b"X-Sp-Message-Id:"), 1)
        self.assertIn(b"X-Sp-Message-Id: 0123456789abcdef0123\r\n", data)
        self.assertEqual({t.message_id for t in self.tokens(data)}, {"0123456789abcdef0123"})

    def test_tracking_off_still_gets_an_id(self) -> None:
        self.send_message(html_message(headers=b"X-Sparky-Track: none\r\n"), b"a@x")
        data = self.h.sink.transactions[0].data
        self.assertEqual(self.tokens(data), [])
        self.assertIn(b"X-Sp-Message-Id: ", data)
        self.assertNotIn(b"X-Sparky-Track", data)

    def test_one_personalised_copy_per_recipient(self) -> None:
        message = html_message(headers=b"X-Sp-Message-Id: 0123456789abcdef0123\r\n")
        mail = b"MAIL FROM:<s@example.com> RET=FULL"
        rcpts = [b"RCPT TO:<a@x> NOTIFY=NEVER", b"RCPT TO:<b@x>", b"RCPT TO:<c@x> ORCPT=rfc822;c@x"]
        self.h.session(mail, *rcpts, b"DATA")
        reply = self.h.send(stuffed(message))
        self.assertTrue(reply.startswith(b"250 "), reply)
        txns = self.h.sink.transactions
        self.assertEqual([(t.mail, t.rcpts) for t in txns], [(mail, [r]) for r in rcpts])
        ids = set()
        for txn, rcpt in zip(txns, ["a@x", "b@x", "c@x"], strict=True):
            tokens = self.tokens(txn.data)
            self.assertEqual({t.rcpt for t in tokens}, {rcpt})
            (message_id,) = {t.message_id for t in tokens}
            self.assertIn(f"X-Sp-Message-Id: {message_id}\r\n".encode(), txn.data)
            self.assertIn(f"for <{rcpt}>;".encode(), txn.data)
            ids.add(message_id)
        self.assertEqual(len(ids), 3)
        self.assertNotIn("0123456789abcdef0123", ids)
        self.assertEqual(self.h.counter("wrapper_copies"), 3)

    def test_copy_refused_after_another_was_delivered_is_451(self) -> None:
        seen: list[bytes] = []

        def hook(proto: Any, verb: bytes, line: bytes) -> bytes | None:
            if verb == b"RCPT" and line == b"RCPT TO:<b@x>":
                seen.append(line)
                if len(seen) == 2:  # accepted in the first transaction, refused later
                    return b"450 4.2.0 try later\r\n"
            return None

        self.h.sink.hook = hook
        reply = self.send_message(html_message(), b"a@x", b"b@x", b"c@x")
        self.assertTrue(reply.startswith(b"451 4.3.0 Copy 2 of 3 refused"), reply)
        self.assertEqual([t.rcpt_addresses for t in self.h.sink.transactions], [["a@x"]])
        self.assertEqual(self.h.counter("wrapper_messages", outcome="partial"), 1)
        # the session goes on
        self.assertTrue(self.send_message(html_message(), b"d@x").startswith(b"250 "))

    def test_content_refused_on_the_first_copy_is_relayed(self) -> None:
        self.h.sink.script[b"END-OF-DATA"] = [b"554 5.7.1 spam\r\n"]
        reply = self.send_message(html_message(), b"a@x", b"b@x")
        self.assertEqual(reply, b"554 5.7.1 spam\r\n")
        self.assertEqual(self.h.sink.transactions, [])

    def test_oversize_message_552_after_the_whole_message(self) -> None:
        h = Harness(max_message_size=10_000)
        h.connect()
        h.session(b"EHLO c", b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")
        big = html_message(extra=b"<p>" + b"x" * 900 + b"</p>\r\n" * 1) * 1
        big = big + (b"<p>" + b"y" * 70 + b"</p>\r\n") * 300
        self.assertEqual(h.send(stuffed(big)[:5000]), b"")
        self.assertEqual(h.send(stuffed(big)[5000:]),
                         b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
        self.assertEqual(h.sink.delivered, 0)
        self.assertLess(len(h.proxy._body), 10)  # nothing stored past the limit
        self.assertEqual(codes(h.session(b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")),
                         [b"250", b"250", b"354"])
        self.assertTrue(h.send(stuffed(html_message())).startswith(b"250 "))

    def test_long_lines_pass_up_to_the_limit(self) -> None:
        h = Harness(max_line_length=50_000)
        h.connect()
        h.session(b"EHLO c", b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")
        line = b"<p>" + b"z" * 40_000 + b'<a href="https://example.com/long">x</a></p>\r\n'
        self.assertTrue(h.send(stuffed(html_message(extra=line))).startswith(b"250 "))
        decoded = quopri.decodestring(h.sink.transactions[0].data.split(b"\r\n\r\n", 1)[1])
        self.assertIn(b"z" * 40_000, decoded)  # made quoted-printable by the rewrite
        h.session(b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")
        reply = h.send(stuffed(html_message(extra=b"w" * 60_000 + b"\r\n")))
        self.assertTrue(reply.startswith(b"500 5.5.2 Message has a line longer"), reply)
        self.assertEqual(h.sink.delivered, 1)

    def test_upstream_dropping_mid_data_gives_451(self) -> None:
        self.h.sink.drop_in_data_after = 100
        reply = self.send_message(html_message(), b"a@x")
        self.assertEqual(reply, b"451 4.4.2 Upstream connection lost or timed out, "
                                b"try again later\r\n")
        self.assertEqual(self.h.sink.delivered, 0)
        self.assertEqual(self.h.counter("wrapper_messages", outcome="upstream_lost"), 1)
        self.assertTrue(self.h.session(b"MAIL FROM:<s@x>").startswith(b"421 4.4.2 "))
        self.assertTrue(self.h.client.lost)

    def test_upstream_timeout_gives_451(self) -> None:
        self.h.sink.script[b"END-OF-DATA"] = []
        self.h.session(b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")
        self.h.sink.hang.add(b"DATA")
        self.assertEqual(self.h.send(stuffed(html_message())), b"")
        self.h.clock.advance(self.h.config.upstream_timeout + 1)
        self.h.pump()
        self.assertEqual(self.h.client.received.split(b"\r\n")[-2:], [
            b"451 4.4.2 Upstream connection lost or timed out, try again later", b""])
        self.assertEqual(self.h.counter("wrapper_messages", outcome="upstream_timeout"), 1)

    def test_client_gone_mid_data_delivers_nothing(self) -> None:
        self.h.session(b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")
        self.h.send(stuffed(html_message())[:200])
        self.h.client.transport.loseConnection()  # type: ignore[union-attr]
        self.h.pump()
        self.assertEqual(self.h.sink.delivered, 0)
        self.assertEqual(self.h.sink.commands[-2:], [b"RSET", b"QUIT"])
        self.assertNotIn(b"DATA", self.h.sink.commands)
        self.assertEqual(self.h.counter("wrapper_messages", outcome="client_lost"), 1)


class AuthTests(SynchronousTestCase):
    def test_auth_plain_and_login_relayed(self) -> None:
        h = Harness(SinkFactory(users={b"user": b"secret"}), allow_plain_auth=True)
        h.connect()
        h.session(b"EHLO c")
        self.assertEqual(h.session(b"AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(h.session(b"dXNlcg=="), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(h.session(b"c2VjcmV0"), b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(h.session(b"AUTH PLAIN AHVzZXIAc2VjcmV0"),
                         b"503 5.5.1 Already authenticated\r\n")
        h.session(b"MAIL FROM:<s@x>", b"RCPT TO:<a@x>", b"DATA")
        h.send(stuffed(html_message()))
        txn = h.sink.transactions[0]
        self.assertEqual(txn.user, b"user")
        self.assertIn(b" with ESMTPA id ", txn.data)

    def test_wrong_password_relayed(self) -> None:
        h = Harness(SinkFactory(users={b"user": b"secret"}), allow_plain_auth=True)
        h.connect()
        h.session(b"EHLO c")
        self.assertEqual(h.session(b"AUTH PLAIN"), b"334 \r\n")
        self.assertEqual(h.session(b"AHVzZXIAd3Jvbmc="),
                         b"535 5.7.8 Authentication credentials invalid\r\n")


class UpstreamTLSTests(SynchronousTestCase):
    def test_required_tls_not_offered_gives_421(self) -> None:
        h = Harness(upstream_tls="required")
        h.connect()
        reply = h.session(b"EHLO c")
        self.assertTrue(reply.startswith(b"421 4.7.0 proxy.test Upstream TLS unavailable"))
        self.assertTrue(h.client.lost)

    def test_opportunistic_without_starttls_goes_on_in_clear(self) -> None:
        h = Harness(upstream_tls="opportunistic")
        h.connect()
        self.assertTrue(h.session(b"EHLO c").startswith(b"250-"))


class ProxyStateTests(SynchronousTestCase):
    def test_factory_builds_proxies(self) -> None:
        h = Harness()
        proto = h.factory.buildProtocol(None)
        self.assertIsInstance(proto, SMTPProxy)
