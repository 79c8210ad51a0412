"""Tests for sparkytwist.mime: locating parts in message bytes, transfer encodings, charsets."""

from __future__ import annotations

import binascii
import quopri

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist import mime


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


NESTED = crlf(
    "From: a@example.com\n"
    "Content-Type: multipart/mixed;\n"
    ' boundary="outer"\n'
    "\n"
    "preamble --outer not a boundary\n"
    "--outer\n"
    'Content-Type: MULTIPART/Alternative; BOUNDARY=inner; charset="x"\n'
    "\n"
    "--inner \t\n"
    "Content-Type: text/plain\n"
    "\n"
    "plain\n"
    "--innerX is not a boundary\n"
    "--inner\n"
    "Content-Type: text/html; charset=utf-8\n"
    "Content-Transfer-Encoding: Quoted-Printable\n"
    "\n"
    "<p>html</p>\n"
    "\n"
    "--inner--\n"
    "--outer\n"
    "Content-Type: message/rfc822\n"
    "\n"
    "Content-Type: multipart/alternative; boundary=fwd\n"
    "\n"
    "--fwd\n"
    "Content-Type: text/html\n"
    "\n"
    "<p>forwarded</p>\n"
    "--fwd--\n"
    "--outer\n"
    "\n"
    "no headers at all\n"
    "--outer--  \n"
    "epilogue\n"
)


class HeaderTests(SynchronousTestCase):
    def test_fields_unfolded_with_spans(self) -> None:
        raw = b"Subject: a\r\n  b\r\nX-Y :  z \r\nnot a header\r\nTo: t\r\n\r\nbody"
        header_end, body_start = mime.split_header_block(raw, 0, len(raw))
        self.assertEqual(raw[body_start:], b"body")
        fields = mime.parse_headers(raw, 0, header_end)
        self.assertEqual([(f.name, f.value) for f in fields],
                         [("subject", "a  b"), ("x-y", "z"), ("to", "t")])  # fmt: skip
        self.assertEqual(raw[fields[0].start : fields[0].end], b"Subject: a\r\n  b\r\n")
        self.assertEqual(raw[fields[2].start : fields[2].end], b"To: t\r\n")

    def test_header_block_edges(self) -> None:
        self.assertEqual(mime.split_header_block(b"\r\nbody", 0, 6), (0, 2))
        self.assertEqual(mime.split_header_block(b"\nbody", 0, 5), (0, 1))
        self.assertEqual(mime.split_header_block(b"A: b\r\n", 0, 6), (6, 6))
        self.assertEqual(mime.split_header_block(b"A: b\n\nx", 0, 7), (5, 6))

    def test_line_ending(self) -> None:
        self.assertEqual(mime.line_ending(b"A: b\r\n\r\n"), b"\r\n")
        self.assertEqual(mime.line_ending(b"A: b\n\n"), b"\n")
        self.assertEqual(mime.line_ending(b"no newline"), b"\r\n")


class ContentTypeTests(SynchronousTestCase):
    def test_params(self) -> None:
        self.assertEqual(
            mime.parse_content_type('Text/HTML; Charset="UTF-8"; boundary=a=b; x="q\\"q"'),
            ("text/html", {"charset": "UTF-8", "boundary": "a=b", "x": 'q"q'}),
        )
        self.assertEqual(
            mime.parse_content_type('multipart/mixed; boundary*0="ab"; boundary*1=cd'),
            ("multipart/mixed", {"boundary": "abcd"}),
        )
        self.assertEqual(
            mime.parse_content_type("text/html; charset*=us-ascii'en'utf%2D8"),
            ("text/html", {"charset": "utf-8"}),
        )

    def test_missing_or_invalid_type_is_text_plain(self) -> None:
        self.assertEqual(mime.parse_content_type(None), ("text/plain", {}))
        self.assertEqual(mime.parse_content_type("html")[0], "text/plain")
        self.assertEqual(mime.parse_content_type("text/ht ml; charset=x")[0], "text/plain")
        self.assertEqual(mime.parse_content_type("")[0], "text/plain")


class WalkTests(SynchronousTestCase):
    def test_nested_multiparts(self) -> None:
        walk = mime.walk(NESTED)
        self.assertEqual(walk.broken, 0)
        types = [p.content_type for p in walk.leaves]
        self.assertEqual(types, ["text/plain", "text/html", "message/rfc822", "text/plain"])
        plain, html, fwd, bare = walk.leaves
        self.assertEqual(NESTED[plain.body_start : plain.end],
                         b"plain\r\n--innerX is not a boundary")  # fmt: skip
        self.assertEqual(NESTED[html.body_start : html.end], b"<p>html</p>\r\n")
        self.assertEqual(html.encoding, "quoted-printable")
        self.assertEqual(html.charset, "utf-8")
        self.assertTrue(NESTED[fwd.body_start : fwd.end].endswith(b"--fwd--"))
        self.assertEqual(NESTED[bare.body_start : bare.end], b"no headers at all")
        self.assertEqual(bare.headers, ())

    def test_bare_lf(self) -> None:
        raw = NESTED.replace(b"\r\n", b"\n")
        walk = mime.walk(raw)
        self.assertEqual(len(walk.leaves), 4)
        html = walk.leaves[1]
        self.assertEqual(raw[html.body_start : html.end], b"<p>html</p>\n")

    def test_unclosed_boundary_is_left_whole(self) -> None:
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html\n\n"
            "<p>x</p>\n"
        )
        walk = mime.walk(raw)
        self.assertEqual((walk.leaves, walk.broken, walk.problems),
                         ((), 1, ("multipart-unclosed",)))  # fmt: skip

    def test_inner_unclosed_boundary(self) -> None:
        """An inner multipart cannot borrow the outer boundary to close itself."""
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=o\n\n--o\n"
            "Content-Type: multipart/alternative; boundary=i\n\n--i\n\nx\n"
            "--o\nContent-Type: text/html\n\n<p>y</p>\n--o--\n"
        )
        walk = mime.walk(raw)
        self.assertEqual([p.content_type for p in walk.leaves], ["text/html"])
        self.assertEqual(walk.broken, 1)

    def test_no_boundary(self) -> None:
        walk = mime.walk(b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nbody\r\n--x--\r\n")
        self.assertEqual((len(walk.leaves), walk.problems), (0, ("multipart-no-boundary",)))

    def test_depth_limit(self) -> None:
        depth = mime.MAX_DEPTH + 5
        head = b"".join(
            b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
            for i in range(depth)
        )
        tail = b"".join(b"\r\n--b%d--" % i for i in reversed(range(depth)))
        raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + head + b"--x" + tail
        walk = mime.walk(raw)
        self.assertEqual(walk.problems, ("mime-too-deep",))

    def test_disposition(self) -> None:
        raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\n"
            'Content-Type: text/html\nContent-Disposition: Attachment; filename="a.html"\n\n'
            "<p>x</p>\n--b--\n"
        )
        (part,) = mime.walk(raw).leaves
        self.assertTrue(part.is_attachment)

    def test_root_given_by_the_caller(self) -> None:
        root = mime.locate_part(NESTED, 0, len(NESTED))
        self.assertEqual(root.content_type, "multipart/mixed")
        self.assertEqual(mime.walk(NESTED, root), mime.walk(NESTED))


class TransferEncodingTests(SynchronousTestCase):
    def test_quoted_printable_strict(self) -> None:
        self.assertEqual(
            mime.decode_body("quoted-printable", b"a=3D=\r\nb =  \r\nc \r\nd=e9"), b"a=b c\r\nd\xe9"
        )
        self.assertIsNone(mime.decode_body("quoted-printable", b'href="x"'))
        self.assertIsNone(mime.decode_body("quoted-printable", b"a=4"))

    def test_base64_strict(self) -> None:
        self.assertEqual(mime.decode_body("base64", b"aGVs\r\nbG8=\r\n"), b"hello")
        self.assertIsNone(mime.decode_body("base64", b"aGVs!bG8="))
        self.assertIsNone(mime.decode_body("base64", b"aGVsbG8"))

    def test_identity_and_unknown(self) -> None:
        for cte in ("7bit", "8bit", "binary"):
            self.assertEqual(mime.decode_body(cte, b"x\xff"), b"x\xff")
        self.assertIsNone(mime.decode_body("x-uuencode", b"begin 644"))

    def test_qp_lines(self) -> None:
        data = ("<p>" + "caf\u00e9 = " * 40 + "</p>\r\n" + "x" * 200 + "\r\n").encode()
        enc = mime.encode_qp(data, b"\r\n")
        self.assertTrue(all(len(line) <= 76 for line in enc.split(b"\r\n")))
        self.assertNotIn(b"\n", enc.replace(b"\r\n", b""))
        self.assertEqual(mime.decode_body("quoted-printable", enc), data)
        lf = mime.encode_qp(data.replace(b"\r\n", b"\n"), b"\n")
        self.assertNotIn(b"\r", lf)
        # data in the other line ending style gets the message's style
        self.assertEqual(mime.encode_qp(b"a\nb\n", b"\r\n"), b"a\r\nb\r\n")
        self.assertEqual(mime.encode_qp(b"a\r\nb", b"\n"), b"a\nb")

    def test_qp_bare_cr(self) -> None:
        data = b"a\rb\r\n" + b"y\r" * 60 + b" \r\n\x00\r"
        enc = mime.encode_qp(data, b"\r\n")
        self.assertNotIn(b"\r", enc.replace(b"\r\n", b""))
        self.assertTrue(all(len(line) <= 76 for line in enc.split(b"\r\n")))
        self.assertEqual(mime.decode_body("quoted-printable", enc), data)

    def test_base64_lines(self) -> None:
        data = bytes(range(256)) * 3
        enc = mime.encode_base64(data, b"\r\n")
        lines = enc.split(b"\r\n")
        self.assertEqual({len(line) for line in lines[:-1]}, {76})
        self.assertEqual(binascii.a2b_base64(enc.replace(b"\r\n", b"")), data)
        self.assertFalse(enc.endswith(b"\n"))

    def test_long_lines(self) -> None:
        self.assertFalse(mime.has_long_line(b"x" * 998 + b"\r\n" + b"y" * 998))
        self.assertTrue(mime.has_long_line(b"x" * 10 + b"\n" + b"y" * 999))
        self.assertFalse(mime.has_long_line(b"short"))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400), st.sampled_from([b"\r\n", b"\n"]))
    def test_qp_round_trip(self, data: bytes, eol: bytes) -> None:
        """Decoding our QP gives the data back, line breaks in the message's style."""
        data = data.replace(b"\r\n", b"\n").replace(b"\n", eol)
        enc = mime.encode_qp(data, eol)
        self.assertTrue(all(len(line) <= 76 for line in enc.split(eol)))
        self.assertEqual(mime.decode_body("quoted-printable", enc), data)
        self.assertEqual(quopri.decodestring(enc), data)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=400))
    def test_base64_round_trip(self, data: bytes) -> None:
        self.assertEqual(mime.decode_body("base64", mime.encode_base64(data, b"\r\n")), data)


class CharsetTests(SynchronousTestCase):
    def test_declared(self) -> None:
        self.assertEqual(mime.decode_text(b"caf\xc3\xa9", "UTF-8"), ("caf\u00e9", "utf-8"))
        self.assertEqual(mime.decode_text(b"caf\xe9", "iso-8859-1"), ("caf\u00e9", "iso8859-1"))
        self.assertEqual(mime.decode_text(b"x", "x-no-such-charset"), "charset-unknown")
        self.assertEqual(mime.decode_text(b"x", "base64"), "charset-unknown")
        self.assertEqual(mime.decode_text(b"caf\xe9", "utf-8"), "charset-undecodable")

    def test_default_is_tolerant(self) -> None:
        """Unlabelled or us-ascii mail often holds UTF-8 or Latin-1: every byte is kept."""
        self.assertEqual(mime.decode_text(b"plain", None), ("plain", "ascii"))
        self.assertEqual(mime.decode_text(b"caf\xc3\xa9", "us-ascii"), ("caf\u00e9", "utf-8"))
        self.assertEqual(mime.decode_text(b"caf\xe9", None), ("caf\u00e9", "latin-1"))

    def test_round_trip_required(self) -> None:
        """A charset whose encoder would write other bytes is not rewritten."""
        self.assertEqual(mime.decode_text("x".encode("utf-16-be"), "utf-16"),
                         "charset-round-trip")  # fmt: skip
        jis = "\u65e5\u672c".encode("iso2022_jp")
        self.assertEqual(mime.decode_text(jis, "ISO-2022-JP"), ("\u65e5\u672c", "iso2022_jp"))
