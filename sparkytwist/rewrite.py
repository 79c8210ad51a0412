# -*- test-case-name: tests.test_rewrite -*-
"""The wrapper's message rewrite: headers, then every HTML part, spliced into the bytes.

Pure functions: the SMTP proxy hands in the DATA bytes (dot-unstuffed) and a
``make_url`` callback that builds tracking URLs for this copy's recipient, and
gets back the bytes to relay. Nothing here raises on bad input: a part we
cannot decode is relayed as it came and counted, because refusing or mangling
a customer's mail is worse than leaving one part untracked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

from sparkytwist import html, mime

_log = Logger()

MESSAGE_ID_HEADER = "X-Sp-Message-Id"
TRACK_HEADER = "X-Sparky-Track"
MSYS_API_HEADER = "X-MSYS-API"
_MESSAGE_ID = re.compile(r"[0-9a-f]{20}")
_EOL = re.compile(rb"\r?\n")
_HTML_TYPES = {"text/html": False, "text/x-amp-html": True}  # type -> is AMP


@dataclass(frozen=True, slots=True)
class TrackingPlan:
    """What to track in one message."""

    opens: bool = True
    clicks: bool = True


@dataclass(frozen=True, slots=True)
class MessageOptions:
    """The per-message choices read from its top-level headers."""

    message_id: str | None  #: a valid X-Sp-Message-Id already there, else None
    plan: TrackingPlan
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RewriteResult:
    """The bytes to relay and what was done to them."""

    data: bytes
    links: int = 0  #: links now going through the tracker
    pixels: int = 0  #: open/initial_open pixels inserted
    parts_rewritten: int = 0  #: HTML parts changed
    parts_skipped: int = 0  #: HTML parts (or whole multiparts) relayed as they came
    problems: tuple[str, ...] = ()  #: short fixed reasons, for counted logs


def new_message_id(now: float, random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    """A fresh X-Sp-Message-Id: 8 hex digits of unix seconds + 48 random bits."""
    return f"{int(now) & 0xFFFFFFFF:08x}{random_bytes(6)[:6].hex():0>12}"


def valid_message_id(s: str) -> bool:
    """Whether ``s`` is a well-formed message id (20 lowercase hex digits)."""
    return _MESSAGE_ID.fullmatch(s) is not None


_TRACK_VALUES = {
    "all": TrackingPlan(True, True),
    "opens": TrackingPlan(True, False),
    "clicks": TrackingPlan(False, True),
    "none": TrackingPlan(False, False),
}


def _top_headers(raw: bytes) -> tuple[int, int, tuple[mime.HeaderField, ...]]:
    header_end, body_start = mime.split_header_block(raw, 0, len(raw))
    return header_end, body_start, mime.parse_headers(raw, 0, header_end)


def read_tracking_options(raw: bytes) -> MessageOptions:
    """Read X-Sp-Message-Id, X-Sparky-Track and X-MSYS-API from the top-level headers.

    ``X-Sparky-Track: all|opens|clicks|none`` (default all; anything else means
    all, and is reported) and SparkPost's ``X-MSYS-API`` ``options.open_tracking``
    / ``options.click_tracking`` set to false both switch tracking off; the
    stricter of the two wins.
    """
    _, _, headers = _top_headers(raw)
    problems: list[str] = []
    message_id = mime.first_value(headers, MESSAGE_ID_HEADER.lower())
    if message_id is not None and not valid_message_id(message_id):
        problems.append("bad-message-id")
        message_id = None
    opens = clicks = True
    track = mime.first_value(headers, TRACK_HEADER.lower())
    if track is not None:
        plan = _TRACK_VALUES.get(track.strip().lower())
        if plan is None:
            problems.append("bad-x-sparky-track")
        else:
            opens, clicks = plan.opens, plan.clicks
    api = mime.first_value(headers, MSYS_API_HEADER.lower())
    if api is not None:
        try:
            options = json.loads(api.encode("latin-1").decode("utf-8", "replace")).get(
                "options", {}
            )
            if not isinstance(options, dict):
                raise TypeError("options is not an object")  # noqa: TRY301
        except (ValueError, TypeError, AttributeError, RecursionError):
            problems.append("bad-x-msys-api")
        else:
            opens = opens and options.get("open_tracking") is not False
            clicks = clicks and options.get("click_tracking") is not False
    return MessageOptions(message_id, TrackingPlan(opens, clicks), tuple(problems))


@dataclass(slots=True)
class _Counts:
    links: int = 0
    pixels: int = 0
    rewritten: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class _HtmlPart:
    """An HTML part decoded and scanned: only the URLs are left to make."""

    part: mime.Part
    codec: str
    scan: html.HtmlScan


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message located, decoded and scanned once, to rewrite for each recipient.

    Everything but the tracking URLs is the same in every recipient's copy; the
    wrapper makes one copy per recipient, so the MIME walk, the decoding and the
    HTML scan (about half of a rewrite) are done once per message, not once per copy.
    """

    raw: bytes
    eol: bytes
    headers: tuple[mime.HeaderField, ...]
    problems: tuple[str, ...]  #: from the MIME walk
    broken: int  #: multiparts relayed as they came
    #: every trackable HTML part in order: scanned, or the reason it is relayed as it came
    parts: tuple[_HtmlPart | str, ...]

    def rewrite(
        self, *, message_id: str, make_url: html.MakeUrl, received: bytes | None = None
    ) -> RewriteResult:
        """This copy's bytes: what :func:`rewrite_message` returns for the same arguments."""
        raw, eol = self.raw, self.eol
        edits: list[tuple[int, int, bytes]] = []
        id_line = f"{MESSAGE_ID_HEADER}: {message_id}".encode("ascii", "replace") + eol
        top: list[bytes] = []
        if received:
            top.append(_EOL.sub(eol, received.rstrip(b"\r\n")) + eol)
        seen_id = False
        for h in self.headers:
            if h.name == TRACK_HEADER.lower():
                edits.append((h.start, h.end, b""))
            elif h.name == MESSAGE_ID_HEADER.lower():
                if seen_id:
                    edits.append((h.start, h.end, b""))  # only one id per message
                elif h.value != message_id:
                    edits.append((h.start, h.end, id_line))
                seen_id = True
        if not seen_id:
            top.append(id_line)
        if top:
            edits.append((0, 0, b"".join(top)))
        problems = list(self.problems)
        counts = _Counts(skipped=self.broken)
        for item in self.parts:
            if isinstance(item, str):
                counts.skipped += 1
                problems.append(item)
                continue
            try:
                outcome = _rewrite_part(raw, item, make_url, eol)
            except Exception:
                _log.failure("unexpected error rewriting an HTML part; relayed as it came")
                outcome = "internal-error"
            if isinstance(outcome, str):
                counts.skipped += 1
                problems.append(outcome)
                continue
            part_edits, result = outcome
            if part_edits:
                edits.extend(part_edits)
                counts.rewritten += 1
                counts.links += result.links
                counts.pixels += result.pixels
            if result.failures:
                problems.append("make-url-failed")
        return RewriteResult(
            _splice(raw, edits),
            counts.links,
            counts.pixels,
            counts.rewritten,
            counts.skipped,
            tuple(problems),
        )


def prepare_message(raw: bytes, plan: TrackingPlan) -> PreparedMessage:
    """Walk, decode and scan ``raw`` once; :meth:`PreparedMessage.rewrite` makes each copy."""
    root = mime.locate_part(raw, 0, len(raw))
    parts: list[_HtmlPart | str] = []
    problems: tuple[str, ...] = ()
    broken = 0
    if (plan.opens or plan.clicks) and root.header_end < len(raw):
        walk = mime.walk(raw, root)
        problems, broken = walk.problems, walk.broken
        for part in walk.leaves:
            amp = _HTML_TYPES.get(part.content_type)
            if amp is None or part.is_attachment:
                continue
            try:
                parts.append(_prepare_part(raw, part, plan, amp=amp))
            except Exception:
                _log.failure("unexpected error rewriting an HTML part; relayed as it came")
                parts.append("internal-error")
    return PreparedMessage(raw, mime.line_ending(raw), root.headers, problems, broken, tuple(parts))


def rewrite_message(
    raw: bytes,
    *,
    message_id: str,
    make_url: html.MakeUrl,
    plan: TrackingPlan,
    received: bytes | None = None,
) -> RewriteResult:
    """The message to relay: headers fixed up, HTML parts tracked per ``plan``.

    Header changes: ``received`` (a trace header the caller built) goes first,
    ``X-Sp-Message-Id: <message_id>`` is set (in place when one exists, else
    added at the top), every ``X-Sparky-Track`` is removed. Every other byte
    outside the rewritten HTML parts is relayed unchanged. For several copies of
    one message, :func:`prepare_message` once and ``rewrite`` each copy.
    """
    return prepare_message(raw, plan).rewrite(
        message_id=message_id, make_url=make_url, received=received
    )


def _prepare_part(raw: bytes, part: mime.Part, plan: TrackingPlan, *, amp: bool) -> _HtmlPart | str:
    """One HTML part decoded and scanned, or the reason it is relayed as it came."""
    data = mime.decode_body(part.encoding, raw[part.body_start : part.end])
    if data is None:
        if part.encoding in ("quoted-printable", "base64"):
            return f"undecodable-{part.encoding}"
        return "unknown-transfer-encoding"
    decoded = mime.decode_text(data, part.charset)
    if isinstance(decoded, str):
        return decoded
    text, codec = decoded
    return _HtmlPart(
        part, codec, html.scan_html(text, opens=plan.opens, clicks=plan.clicks, amp=amp)
    )


def _rewrite_part(
    raw: bytes, prepared: _HtmlPart, make_url: html.MakeUrl, eol: bytes
) -> tuple[list[tuple[int, int, bytes]], html.HtmlRewrite] | str:
    """The edits for one HTML part, or the reason it is relayed as it came."""
    part, codec = prepared.part, prepared.codec
    result = prepared.scan.rewrite(make_url)
    if not result.changed:
        return [], result
    edits: list[tuple[int, int, bytes]] = []
    try:
        if part.encoding == "quoted-printable":
            new_body = mime.encode_qp(result.text.encode(codec), eol)
        elif part.encoding == "base64":
            body = raw[part.body_start : part.end]
            trailing = body[len(body.rstrip(b" \t\r\n")) :]
            new_body = mime.encode_base64(result.text.encode(codec), eol) + trailing
        else:
            new_body = result.text.encode(codec)
            if part.encoding != "binary" and mime.has_long_line(new_body):
                new_body = mime.encode_qp(new_body, eol)
                edits.extend(_set_transfer_encoding(raw, part, eol))
    except UnicodeError:
        return "charset-unencodable"
    edits.append((part.body_start, part.end, new_body))
    return edits, result


def _set_transfer_encoding(raw: bytes, part: mime.Part, eol: bytes) -> list[tuple[int, int, bytes]]:
    """Edits that make the part's Content-Transfer-Encoding quoted-printable."""
    fields = [h for h in part.headers if h.name == "content-transfer-encoding"]
    if not fields:
        line = b"Content-Transfer-Encoding: quoted-printable" + eol
        return [(part.header_end, part.header_end, line)]
    edits = []
    for h in fields:
        colon = raw.index(b":", h.start, h.end)
        line_eol = eol if raw.endswith(b"\n", h.start, h.end) else b""
        edits.append((colon + 1, h.end, b" quoted-printable" + line_eol))
    return edits


def _splice(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``raw`` with each (start, end, new) span replaced; inserts keep their order."""
    if not edits:
        return raw
    edits.sort(key=lambda e: (e[0], e[1]))
    out = []
    pos = 0
    for start, end, new in edits:
        out.append(raw[pos:start])
        out.append(new)
        pos = end
    out.append(raw[pos:])
    return b"".join(out)
