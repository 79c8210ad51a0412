"""Tests for sparkytwist.rewrite: whole messages in, the bytes to relay out."""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.html import initial_block, open_pixel
from sparkytwist.rewrite import (
    MessageOptions,
    TrackingPlan,
    new_message_id,
    prepare_message,
    read_tracking_options,
    rewrite_message,
    valid_message_id,
)

MESSAGES = Path(__file__).parent / "data" / "messages"
MSG_ID = "665f00aa0123456789ab"
ALL = TrackingPlan(opens=True, clicks=True)
NONE = TrackingPlan(opens=False, clicks=False)
TRACKER = "https://trk.example.net/"


class Recorder:
    """make_url that records its calls; URLs are TRACKER + action + call number."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, action: str, url: str | None) -> str:
        self.calls.append((action, url))
        return f"{TRACKER}{action}/{len(self.calls)}"

    def url_of(self, index: int) -> str:
        action = self.calls[index][0]
        return f"{TRACKER}{action}/{index + 1}"


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


class MessageIdTests(SynchronousTestCase):
    def test_new_message_id(self) -> None:
        mid = new_message_id(0x665F00AA + 0.9, lambda n: bytes(range(1, n + 1)))
        self.assertEqual(mid, "665f00aa010203040506")
        self.assertTrue(valid_message_id(mid))
        self.assertTrue(valid_message_id(new_message_id(1.7e9)))
        self.assertNotEqual(new_message_id(1.7e9), new_message_id(1.7e9))

    def test_valid_message_id(self) -> None:
        for bad in [
            "",
            "665F00AA010203040506",
            "665f00aa01020304050",
            "665f00aa0102030405067",
            "665f00aa01020304050g",
            " 665f00aa010203040506",
            "00000deadbeeff00d1337x",
        ]:
            self.assertFalse(valid_message_id(bad), bad)  # fmt: skip


class ReadOptionsTests(SynchronousTestCase):
    def options(self, headers: str) -> MessageOptions:
        return read_tracking_options(headers.encode() + b"\r\n\r\nbody\r\n")

    def test_defaults(self) -> None:
        self.assertEqual(self.options("From: a"), MessageOptions(None, ALL, ()))

    def test_x_sparky_track(self) -> None:
        for value, plan in [
            ("all", ALL), ("opens", TrackingPlan(True, False)),
            ("CLICKS", TrackingPlan(False, True)), (" none ", NONE),
        ]:  # fmt: skip
            self.assertEqual(self.options(f"X-Sparky-Track: {value}").plan, plan)
        self.assertEqual(self.options("x-sparky-track: maybe"),
                         MessageOptions(None, ALL, ("bad-x-sparky-track",)))  # fmt: skip

    def test_msys_api(self) -> None:
        opts = self.options('X-MSYS-API: {"options": {"open_tracking": false}}')
        self.assertEqual(opts.plan, TrackingPlan(False, True))
        opts = self.options('X-MSYS-API: {"options":\r\n  {"click_tracking": false,\r\n'
                            '  "open_tracking": true}}')  # fmt: skip
        self.assertEqual(opts.plan, TrackingPlan(True, False))
        opts = self.options('X-MSYS-API: {"campaign_id": "x"}\r\nX-Sparky-Track: opens')
        self.assertEqual(opts.plan, TrackingPlan(True, False))
        for bad in ["{not json", "[1]", '{"options": 3}', "null"]:
            opts = self.options(f"X-MSYS-API: {bad}")
            self.assertEqual((opts.plan, opts.problems), (ALL, ("bad-x-msys-api",)), bad)

    def test_message_id(self) -> None:
        self.assertEqual(self.options(f"X-SP-MESSAGE-ID: {MSG_ID}").message_id, MSG_ID)
        opts = self.options("X-Sp-Message-Id: nope")
        self.assertEqual((opts.message_id, opts.problems), (None, ("bad-message-id",)))

    def test_only_top_level_headers(self) -> None:
        raw = b"From: a\r\n\r\nX-Sparky-Track: none\r\n"
        self.assertEqual(read_tracking_options(raw).plan, ALL)


class HeaderRewriteTests(SynchronousTestCase):
    def rewrite(self, raw: bytes, **kw: object) -> bytes:
        return rewrite_message(raw, message_id=MSG_ID, make_url=Recorder(), plan=ALL,
                               **kw).data  # type: ignore[arg-type]  # fmt: skip

    def test_id_added_at_top(self) -> None:
        raw = b"From: a\r\nSubject: s\r\n\r\nbody\r\n"
        self.assertEqual(self.rewrite(raw), b"X-Sp-Message-Id: " + MSG_ID.encode() + b"\r\n" + raw)

    def test_id_replaced_in_place_duplicates_removed(self) -> None:
        raw = (b"From: a\r\nX-Sp-Message-Id: 00000000000000000000\r\nTo: b\r\n"
               b"x-sp-message-id: 11111111111111111111\r\n\r\nbody\r\n")  # fmt: skip
        self.assertEqual(
            self.rewrite(raw),
            b"From: a\r\nX-Sp-Message-Id: " + MSG_ID.encode() + b"\r\nTo: b\r\n\r\nbody\r\n",
        )

    def test_same_id_kept(self) -> None:
        raw = b"From: a\r\nx-sp-message-id:  " + MSG_ID.encode() + b"\r\n\r\nbody\r\n"
        self.assertEqual(self.rewrite(raw), raw)

    def test_track_header_removed_msys_kept(self) -> None:
        raw = (b"From: a\r\nX-Sparky-Track: opens\r\n  folded\r\nX-MSYS-API: {}\r\n"
               b"X-SPARKY-TRACK: none\r\n\r\nX-Sparky-Track: body text\r\n")  # fmt: skip
        out = self.rewrite(raw)
        self.assertEqual(
            out,
            b"X-Sp-Message-Id: " + MSG_ID.encode() + b"\r\nFrom: a\r\nX-MSYS-API: {}\r\n"
            b"\r\nX-Sparky-Track: body text\r\n",
        )

    def test_received_prepended_in_the_message_style(self) -> None:
        received = b"Received: from gen (gen [192.0.2.1])\r\n\tby us; Tue, 4 Jun 2024\r\n"
        raw = b"From: a\n\nbody\n"
        out = self.rewrite(raw, received=received)
        self.assertEqual(
            out,
            b"Received: from gen (gen [192.0.2.1])\n\tby us; Tue, 4 Jun 2024\n"
            b"X-Sp-Message-Id: " + MSG_ID.encode() + b"\nFrom: a\n\nbody\n",
        )

    def test_odd_messages(self) -> None:
        idline = b"X-Sp-Message-Id: " + MSG_ID.encode() + b"\r\n"
        self.assertEqual(self.rewrite(b""), idline)
        self.assertEqual(self.rewrite(b"\r\nbody only"), idline + b"\r\nbody only")
        self.assertEqual(self.rewrite(b"Subject: x"), idline + b"Subject: x")
        self.assertEqual(self.rewrite(b"X-Sparky-Track: none"), idline)

    def test_nothing_tracked_leaves_the_body(self) -> None:
        raw = (MESSAGES / "01_qp_soft_breaks.eml").read_bytes()
        rec = Recorder()
        result = rewrite_message(raw, message_id=MSG_ID, make_url=rec, plan=NONE)
        self.assertEqual(result.data, b"X-Sp-Message-Id: " + MSG_ID.encode() + b"\r\n" + raw)
        self.assertEqual(rec.calls, [])


# --- the corpus ----------------------------------------------------------------


@dataclass
class Case:
    """What rewriting one corpus message must do."""

    links: list[tuple[str, str]]  #: make_url calls for links, in document order
    changed: list[str] = field(default_factory=lambda: ["text/html"])  #: changed part types
    initial_after: str = "body"  #: body | head | start
    open_before: str = "body"  #: body | html | end
    skipped: int = 0
    problems: tuple[str, ...] = ()
    cte_to_qp: bool = False
    pixels: bool = True


CORPUS: dict[str, Case] = {
    "01_qp_soft_breaks.eml": Case([
        ("c", "https://www.example.com/products/summer-sale?utm_source=newsletter"
              "&utm_medium=email&utm_campaign=2024-06"),
        ("c", "http://shop.example.org/cart"),
    ]),
    "02_base64_single.eml": Case([
        ("c", "https://orders.example.com/o/12345?sig=abc"),
        ("c", "https://example.com/unsubscribe?u=fred%40example.org"),
    ]),
    "03_nested_mixed.eml": Case([("c", "https://billing.example.com/pay/42")]),
    "04_latin1_qp.eml": Case([("c", "https://example.fr/caf\u00e9/menu?jour=lundi&lang=fr")]),
    "05_utf8_8bit.eml": Case([("c", "https://example.jp/\u5546\u54c1/42?q=\u65b0")]),
    "06_no_body_tag.eml": Case(
        [("c", "https://example.com/hello")], initial_after="head", open_before="html"
    ),
    "07_fragment.eml": Case(
        [("c", "http://example.com/fragment")], initial_after="start", open_before="end"
    ),
    "08_uppercase_quoting.eml": Case([
        ("c", "https://example.com/a?x=1&y=2"),
        ("c", "https://example.com/b?x=1&region=eu"),
        ("c", "http://example.com/c?x=1&y=2&z=3"),
        ("c", "HTTPS://Example.com/d"),
        ("c", "https://example.com/e"),
        ("c", "https://example.com/f?a=1&not=2&copy=3<x"),
    ]),
    "09_untracked_links.eml": Case([("c", "https://example.com/msys-on")]),
    "10_bare_lf.eml": Case([("c", "https://example.com/lf?a=1&b=2")]),
    "11_long_line_7bit.eml": Case([("c", "http://x.co/a")], cte_to_qp=True),
    "12_rfc822_attachment.eml": Case([("c", "https://example.com/outer")]),
    "13_amp.eml": Case(
        [("ac", "https://example.com/amp"), ("c", "https://example.com/html")],
        changed=["text/x-amp-html", "text/html"],
    ),
    "14_broken_base64.eml": Case(
        [], changed=[], skipped=1, problems=("undecodable-base64",)
    ),
    "15_unclosed_boundary.eml": Case(
        [], changed=[], skipped=1, problems=("multipart-unclosed",)
    ),
    "16_tracking_headers.eml": Case([("c", "https://example.com/clicks-only")], pixels=False),
}  # fmt: skip

_TOP_FIELD = re.compile(
    rb"^(?:x-sparky-track|x-sp-message-id)[ \t]*:.*\n(?:[ \t].*\n)*", re.I | re.M
)


_HREF = re.compile(r"""href\s*=\s*("[^"]*"|'[^']*'|[^\s>]*)""", re.I)


def _leaves(msg: email.message.EmailMessage) -> list[email.message.Message]:
    return [p for p in msg.walk() if not p.is_multipart()]


def _payload_bytes(part: email.message.Message) -> bytes:
    """The part's body as it is in the message bytes (still transfer-encoded)."""
    if part.get("Content-Transfer-Encoding", "7bit").lower() in ("quoted-printable", "base64"):
        payload = part.get_payload(decode=False)
        assert isinstance(payload, str)
        return payload.encode("ascii")
    data = part.get_payload(decode=True)  # 7bit/8bit: the raw bytes
    assert isinstance(data, bytes)
    return data


class CorpusTests(SynchronousTestCase):
    """Real-world-shaped messages: decoded with the email package, checked part by part."""

    def check(self, name: str) -> None:
        case = CORPUS[name]
        raw = (MESSAGES / name).read_bytes()
        options = read_tracking_options(raw)
        rec = Recorder()
        message_id = options.message_id or MSG_ID
        result = rewrite_message(raw, message_id=message_id, make_url=rec, plan=options.plan)
        out = result.data

        # make_url saw exactly the original links, entity-decoded
        self.assertEqual([c for c in rec.calls if c[0] in ("c", "ac")], case.links)
        self.assertEqual(result.links, len(case.links))
        self.assertEqual(result.parts_rewritten, len(case.changed))
        self.assertEqual(result.parts_skipped, case.skipped)
        self.assertEqual(result.problems, case.problems)

        before, after = parse(raw), parse(out)
        self.assertEqual(after["X-Sp-Message-Id"], message_id)
        self.assertEqual(after.get_all("X-Sparky-Track"), None)
        keep = [(k, v) for k, v in before.raw_items() if k.lower() not in
                ("x-sparky-track", "x-sp-message-id")]  # fmt: skip
        self.assertEqual(
            [(k, v) for k, v in after.raw_items() if k.lower() != "x-sp-message-id"], keep
        )
        if b"\r\n" not in raw:
            self.assertNotIn(b"\r", out)

        # every part but the rewritten HTML ones is byte for byte the same
        in_leaves, out_leaves = _leaves(before), _leaves(after)
        self.assertEqual(
            [p.get_content_type() for p in in_leaves], [p.get_content_type() for p in out_leaves]
        )
        raw_rest, out_rest = _TOP_FIELD.sub(b"", raw), _TOP_FIELD.sub(b"", out)
        changed = []
        calls = iter(enumerate(rec.calls))
        for i, (pin, pout) in enumerate(zip(in_leaves, out_leaves, strict=True)):
            if pin.get_content_type() == "message/rfc822":
                continue
            bin_, bout = _payload_bytes(pin), _payload_bytes(pout)
            if bin_ == bout:
                continue
            changed.append(pin.get_content_type())
            self.assertIn(bin_, raw_rest)
            raw_rest = raw_rest.replace(bin_, b"@@PART%d@@" % i, 1)
            out_rest = out_rest.replace(bout, b"@@PART%d@@" % i, 1)
            self.check_html_part(case, pin, pout, calls)
        if case.cte_to_qp:
            raw_rest = raw_rest.replace(b"Content-Transfer-Encoding: 7bit", b"@@CTE@@", 1)
            out_rest = out_rest.replace(
                b"Content-Transfer-Encoding: quoted-printable", b"@@CTE@@", 1
            )
        self.assertEqual(changed, case.changed)
        self.assertEqual(out_rest, raw_rest)
        # and the message still parses the same way
        self.assertEqual([type(d) for d in after.defects], [type(d) for d in before.defects])

    def check_html_part(
        self,
        case: Case,
        pin: email.message.Message,
        pout: email.message.Message,
        calls: object,
    ) -> None:
        assert isinstance(pin, email.message.EmailMessage)
        assert isinstance(pout, email.message.EmailMessage)
        content_in, content_out = pin.get_content(), pout.get_content()
        self.assertEqual(pin.get_content_charset(), pout.get_content_charset())
        amp = pin.get_content_type() == "text/x-amp-html"
        urls: dict[str, str] = {}
        for index, (action, _url) in calls:  # type: ignore[attr-defined]
            urls[action] = f"{TRACKER}{action}/{index + 1}"
            if action in ("c", "ac"):
                self.assertIn(f"{TRACKER}{action}/{index + 1}", content_out)
            if action == ("ao" if amp else "o") or (action == "h" and not case.pixels):
                break
        if not case.pixels:
            block = initial_block(None, urls["h"])
            self.assertNotIn(f"{TRACKER}o/", content_out)
            self.assertNotIn(f"{TRACKER}i/", content_out)
            self.assertEqual(content_out.count(block), 1)
            return
        block = initial_block(urls["ai" if amp else "i"], urls.get("h"), amp=amp)
        pixel = open_pixel(urls["ao" if amp else "o"], amp=amp)
        self.assertEqual(content_out.count(block), 1)
        self.assertEqual(content_out.count(pixel), 1)
        initial_at = {"body": r"<body[^>]*>", "head": r"</head>", "start": r"\A"}
        self.assertRegex(content_out, re.compile(initial_at[case.initial_after]
                                                 + re.escape(block), re.I))  # fmt: skip
        open_at = {"body": r"</body>", "html": r"</html>", "end": r"\Z"}
        self.assertRegex(content_out, re.compile(re.escape(pixel) + open_at[case.open_before],
                                                 re.I))  # fmt: skip
        # outside the inserted blocks and the href values, the text is unchanged
        stripped = content_out.replace(block, "").replace(pixel, "")
        self.assertEqual(_HREF.sub("href=@", stripped), _HREF.sub("href=@", content_in))

    def test_corpus_is_complete(self) -> None:
        self.assertEqual(sorted(p.name for p in MESSAGES.glob("*.eml")), sorted(CORPUS))

    def test_nothing_tracked(self) -> None:
        """With tracking off, every corpus message changes only in its headers."""
        for path in sorted(MESSAGES.glob("*.eml")):
            raw = path.read_bytes()
            result = rewrite_message(raw, message_id=MSG_ID, make_url=Recorder(), plan=NONE)
            eol = b"\n" if b"\r\n" not in raw else b"\r\n"
            expected = b"X-Sp-Message-Id: " + MSG_ID.encode() + eol + _TOP_FIELD.sub(b"", raw)
            self.assertEqual(result.data, expected, path.name)

    def test_html_attachment_untouched(self) -> None:
        raw = (MESSAGES / "03_nested_mixed.eml").read_bytes()
        out = rewrite_message(raw, message_id=MSG_ID, make_url=Recorder(), plan=ALL).data
        attachment = (b'<html><body><p>Invoice 42</p><a href="https://billing.example.com/pay/42">'
                      b"Pay now</a></body></html>\r\n")  # fmt: skip
        self.assertIn(attachment, out)

    def test_long_line_becomes_quoted_printable(self) -> None:
        raw = (MESSAGES / "11_long_line_7bit.eml").read_bytes()
        out = rewrite_message(raw, message_id=MSG_ID, make_url=Recorder(), plan=ALL).data
        self.assertTrue(all(len(line) <= 998 for line in out.split(b"\r\n")))
        (html,) = [p for p in parse(out).walk() if p.get_content_type() == "text/html"]
        self.assertEqual(html["Content-Transfer-Encoding"], "quoted-printable")


def _corpus_test(name: str):  # type: ignore[no-untyped-def]
    def test(self: CorpusTests) -> None:
        self.check(name)

    test.__doc__ = f"corpus message {name}"
    return test


for _name in CORPUS:
    setattr(CorpusTests, "test_" + _name.removesuffix(".eml"), _corpus_test(_name))


# --- property tests -----------------------------------------------------------------

_EOLS = st.sampled_from(["\r\n", "\n"])
_HTML_BITS = st.lists(
    st.sampled_from(['<a href="http://e.com/x?a=1&amp;b=2">x</a>', "<body>", "</body>",
                     "<!-- c -->", "caf\u00e9", "=", " ", "\n", "<p>", "x" * 80, "&region=1"]),
    max_size=12,
).map("".join)  # fmt: skip


@st.composite
def _leaf(draw: st.DrawFn, eol: str) -> str:
    ctype = draw(st.sampled_from(["text/html", "text/plain", "text/x-amp-html",
                                  "image/png", "message/rfc822", "text/html"]))  # fmt: skip
    cte = draw(st.sampled_from(["", "7bit", "8bit", "quoted-printable", "base64", "x-bad"]))
    charset = draw(st.sampled_from(["", "; charset=utf-8", '; CHARSET="iso-8859-1"',
                                    "; charset=x-unknown", "; charset=utf-16"]))  # fmt: skip
    disposition = draw(st.sampled_from(["", "Content-Disposition: attachment" + eol]))
    body = draw(_HTML_BITS)
    if cte == "base64" and draw(st.booleans()):
        import base64

        body = base64.encodebytes(body.encode()).decode()
    elif cte == "quoted-printable" and draw(st.booleans()):
        import quopri

        body = quopri.encodestring(body.encode()).decode()
    headers = f"Content-Type: {ctype}{charset}{eol}" if draw(st.integers(0, 5)) else ""
    if cte:
        headers += f"Content-Transfer-Encoding: {cte}{eol}"
    return headers + disposition + eol + body.replace("\n", eol)


@st.composite
def _entity(draw: st.DrawFn, eol: str, depth: int = 0) -> str:
    if depth >= 3 or draw(st.booleans()):
        return draw(_leaf(eol))
    boundary = draw(st.sampled_from(["b1", "=_b2", "b-3", "b 4"])) + str(depth)
    subtype = draw(st.sampled_from(["mixed", "alternative", "related"]))
    parts = draw(st.lists(_entity(eol, depth + 1), min_size=0, max_size=3))
    quote = draw(st.sampled_from(['"', ""]))
    head = f"Content-Type: multipart/{subtype};{eol} boundary={quote}{boundary}{quote}{eol}{eol}"
    body = draw(st.sampled_from(["", "preamble" + eol]))
    for p in parts:
        body += f"--{boundary}{draw(st.sampled_from(['', ' ', chr(9)]))}{eol}{p}{eol}"
    if draw(st.integers(0, 9)):  # now and then the close delimiter is missing
        body += f"--{boundary}--{eol}"
    body += draw(st.sampled_from(["", "epilogue" + eol]))
    return head + body


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    eol = draw(_EOLS)
    top = draw(st.lists(st.sampled_from([
        "From: a@example.com", "X-Sparky-Track: none", "X-Sparky-Track: opens",
        "X-MSYS-API: {\"options\": {\"open_tracking\": false}}", "Subject: hi",
        "X-Sp-Message-Id: 00000000000000000000", "X-Sp-Message-Id: " + MSG_ID,
    ]), max_size=4))  # fmt: skip
    raw = "".join(h + eol for h in top) + draw(_entity(eol))
    data = raw.encode("utf-8")
    # mangle: cut it short, or drop or insert a few bytes
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        op = draw(st.sampled_from(["cut", "drop", "insert"]))
        at = draw(st.integers(0, len(data)))
        if op == "cut":
            data = data[:at]
        elif op == "drop":
            data = data[:at] + data[at + draw(st.integers(1, 4)) :]
        else:
            data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


def _expected_untracked(raw: bytes, message_id: str) -> bytes:
    """The input with our header changes applied, computed the simple way."""
    from sparkytwist import mime

    header_end, _ = mime.split_header_block(raw, 0, len(raw))
    eol = mime.line_ending(raw)
    fields = mime.parse_headers(raw, 0, header_end)
    out, pos, seen = [], 0, False
    for h in fields:
        if h.name == "x-sparky-track" or (h.name == "x-sp-message-id" and seen):
            out.append(raw[pos : h.start])
            pos = h.end
        elif h.name == "x-sp-message-id":
            seen = True
            if h.value != message_id:
                out.append(raw[pos : h.start] + b"X-Sp-Message-Id: " + message_id.encode() + eol)
                pos = h.end
    out.append(raw[pos:])
    prefix = b"" if seen else b"X-Sp-Message-Id: " + message_id.encode() + eol
    return prefix + b"".join(out)


class PreparedMessageTests(SynchronousTestCase):
    """prepare_message once, rewrite per recipient: each copy is rewrite_message's bytes."""

    def copies(self, raw: bytes, plan: TrackingPlan) -> None:
        prepared = prepare_message(raw, plan)
        for n, base in enumerate(["https://a.example/", "https://b.example/?r=2&x=\"'", ""]):

            def make_url(action: str, url: str | None, base: str = base) -> str:
                if not base:
                    raise ValueError("no tracking domain")
                return f"{base}{action}/{url}"

            received = b"Received: by us; copy %d\r\n" % n
            mid = f"665f00aa01234567890{n}"
            self.assertEqual(
                prepared.rewrite(message_id=mid, make_url=make_url, received=received),
                rewrite_message(
                    raw, message_id=mid, make_url=make_url, plan=plan, received=received
                ),
            )
        self.flushLoggedErrors(ValueError)

    def test_corpus(self) -> None:
        for path in sorted(MESSAGES.iterdir()):
            for plan in (ALL, NONE, TrackingPlan(True, False), TrackingPlan(False, True)):
                self.copies(path.read_bytes(), plan)

    def test_copies_differ_only_in_their_urls(self) -> None:
        raw = (MESSAGES / "01_qp_soft_breaks.eml").read_bytes()
        prepared = prepare_message(raw, ALL)
        first = prepared.rewrite(message_id=MSG_ID, make_url=Recorder())
        again = prepared.rewrite(message_id=MSG_ID, make_url=Recorder())
        self.assertEqual(first, again)
        self.assertGreater(first.links, 0)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_mangled_mime(self, data: st.DataObject) -> None:
        self.copies(data.draw(_message()), ALL)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_message())
    def test_mangled_mime_never_raises(self, raw: bytes) -> None:
        rec = Recorder()
        result = rewrite_message(raw, message_id=MSG_ID, make_url=rec, plan=ALL,
                                 received=b"Received: by us\r\n")  # fmt: skip
        self.assertNotIn("internal-error", result.problems)
        self.assertTrue(result.data.startswith(b"Received: by us"))
        parse(result.data)
        untracked = rewrite_message(raw, message_id=MSG_ID, make_url=rec, plan=NONE)
        self.assertEqual(untracked.data, _expected_untracked(raw, MSG_ID))
        self.assertEqual(untracked.links + untracked.pixels + untracked.parts_rewritten, 0)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes_never_raise(self, raw: bytes) -> None:
        result = rewrite_message(raw, message_id=MSG_ID, make_url=Recorder(), plan=ALL)
        self.assertNotIn("internal-error", result.problems)
        read_tracking_options(raw)
        if b"x-sp" not in raw.lower():
            none = rewrite_message(raw, message_id=MSG_ID, make_url=Recorder(), plan=NONE)
            first = raw.find(b"\n")
            eol = b"\n" if first >= 0 and not raw[:first].endswith(b"\r") else b"\r\n"
            self.assertEqual(none.data, b"X-Sp-Message-Id: " + MSG_ID.encode() + eol + raw)
