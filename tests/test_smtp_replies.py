"""Reply parsing, command parsing, the Received header and dot-stuffing."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.smtp.commands import parse_path, size_param
from sparkytwist.smtp.received import address_literal, received_header
from sparkytwist.smtp.replies import Reply, ReplyError, ReplyParser
from sparkytwist.smtp.upstream import dot_stuff


class ReplyTests(SynchronousTestCase):
    def test_multi_line_reply_relayed_byte_for_byte(self) -> None:
        parser = ReplyParser()
        self.assertIsNone(parser.feed(b"550-5.1.1 first"))
        reply = parser.feed(b"550 5.1.1 second")
        assert reply is not None
        self.assertEqual((reply.code, reply.lines), (550, (b"5.1.1 first", b"5.1.1 second")))
        self.assertEqual(reply.to_bytes(), b"550-5.1.1 first\r\n550 5.1.1 second\r\n")
        reply = ReplyParser().feed(b"334 ")
        assert reply is not None
        self.assertEqual(reply.to_bytes(), b"334 \r\n")

    def test_malformed_lines_refused(self) -> None:
        for bad in (b"hello", b"25", b"250x", b"999 no"):
            self.assertRaises(ReplyError, ReplyParser().feed, bad)
        parser = ReplyParser()
        parser.feed(b"250-a")
        self.assertRaises(ReplyError, parser.feed, b"251 b")

    def test_our_replies(self) -> None:
        self.assertEqual(Reply.of(250, "a", "b").to_bytes(), b"250-a\r\n250 b\r\n")


class CommandTests(SynchronousTestCase):
    def test_paths(self) -> None:
        self.assertEqual(parse_path(b"RCPT TO:<a@b> NOTIFY=NEVER"), (b"a@b", b"NOTIFY=NEVER"))
        self.assertEqual(parse_path(b"mail from:<>"), (b"", b""))
        self.assertEqual(parse_path(b'RCPT TO:<"odd > name"@b>'), (b'"odd > name"@b', b""))
        self.assertEqual(parse_path(b"RCPT TO:<@relay:a@b>"), (b"a@b", b""))
        self.assertEqual(parse_path(b"RCPT TO: a@b"), (b"a@b", b""))
        self.assertIsNone(parse_path(b"RCPT <a@b>"))
        self.assertEqual(size_param(b"BODY=8BITMIME SIZE=1234"), 1234)
        self.assertIsNone(size_param(b"XSIZE=5"))


class ReceivedTests(SynchronousTestCase):
    def test_header_cannot_be_injected(self) -> None:
        header = received_header(helo=b"evil\r\nBcc: x", client_ip="::ffff:192.0.2.1",
                                 hostname="p.test", protocol="ESMTPS", message_id="0" * 20,
                                 rcpt=b"a@b>\nX: y", now=0)
        self.assertEqual(header.count(b"\n"), 2)  # the two folds, nothing else
        self.assertIn(b"from evil??Bcc: x ([192.0.2.1])", header)
        self.assertTrue(header.endswith(b"for <a@b??X: y>; Thu, 01 Jan 1970 00:00:00 +0000"))
        self.assertEqual(address_literal("2001:db8::1"), "[IPv6:2001:db8::1]")


class DotStuffTests(SynchronousTestCase):
    @settings(max_examples=200)
    @given(st.lists(st.sampled_from([b".", b"..", b"a", b"\r\n", b"\n", b"\r", b" "]),
                    max_size=30).map(b"".join))
    def test_stuffed_data_ends_only_at_its_end(self, data: bytes) -> None:
        out = dot_stuff(data)
        self.assertTrue(out.endswith(b"\r\n.\r\n") or out == b".\r\n")
        body = out[:-3]
        self.assertNotIn(b"\r\n.\r\n", body)
        self.assertNotIn(b"\n.\r\n", body[:-2] if body.endswith(b"\r\n") else body)
        # a dot starting any line (after CRLF, or after a bare LF: smuggling defence)
        # is doubled, so taking one off each gives the data back
        if data.endswith(b"\r\n") or not data:
            self.assertEqual(re.sub(rb"(\A|\n)\.", rb"\1", body), data)
