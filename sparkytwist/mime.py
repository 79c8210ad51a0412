# -*- test-case-name: tests.test_mime -*-
"""Find the leaf parts of a MIME message in its bytes; transfer encodings; charsets.

Nothing here re-serialises a message: the :mod:`email` package rewrites headers
and boundaries when it writes a message back, which would break DKIM-style
expectations and change mail we promised to leave alone. We only locate byte
spans (a part's header block, its body) so the caller can splice new bytes into
exactly the parts it rewrites.
"""

from __future__ import annotations

import binascii
import codecs
import itertools
import re
from dataclasses import dataclass, field

#: Deeper nesting than this is treated as broken (a real mail nests 3 or 4 levels).
MAX_DEPTH = 32
#: Longest line SMTP allows without the CRLF (RFC 5322 section 2.1.1).
MAX_LINE = 998

# A header field: name, colon, value with its folded continuation lines.
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*(?:\n[ \t].*)*)\n?", re.MULTILINE)
_HEADER_END = re.compile(rb"\n\r?\n")
_FOLD = re.compile(rb"\r?\n")
_PARAM = re.compile(
    r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;\s]*)', re.DOTALL
)  # fmt: skip
_CONTINUATION = re.compile(r"^(.*?)\*(\d+)(\*?)$|^(.*)\*$")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_MIME_TYPE = re.compile(r"[!#-'*+.0-9A-Z^-~-]+/[!#-'*+.0-9A-Z^-~-]+", re.ASCII)


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field: lower-cased name, unfolded value, and its byte span."""

    name: str
    value: str  #: unfolded, stripped, bytes read as latin-1 (so no byte is lost)
    start: int
    end: int  #: just past the field's line ending


@dataclass(frozen=True, slots=True)
class Part:
    """A part (or the message itself) located in the message bytes."""

    start: int  #: first byte of its header block
    header_end: int  #: end of the header block, i.e. where the blank line starts
    body_start: int  #: first byte of the body (after the blank line)
    end: int  #: end of the body (the line ending before a boundary is not part of it)
    headers: tuple[HeaderField, ...]
    content_type: str  #: "type/subtype", lower case; text/plain when missing or invalid
    params: dict[str, str] = field(hash=False, compare=False)
    encoding: str = "7bit"  #: Content-Transfer-Encoding, lower case
    disposition: str = ""  #: Content-Disposition type, lower case ("" when absent)

    @property
    def charset(self) -> str | None:
        return self.params.get("charset")

    @property
    def is_attachment(self) -> bool:
        return self.disposition == "attachment"


@dataclass(frozen=True, slots=True)
class MimeWalk:
    """The leaf parts found, and the multiparts that could not be entered."""

    leaves: tuple[Part, ...]
    broken: int  #: multiparts left untouched (no boundary, never closed, too deep)
    problems: tuple[str, ...]


def line_ending(raw: bytes) -> bytes:
    """The message's line ending style: CRLF unless its first line ends in a bare LF."""
    i = raw.find(b"\n")
    return b"\n" if i == 0 or (i > 0 and raw[i - 1] != 0x0D) else b"\r\n"


def split_header_block(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """(header_end, body_start) of the part spanning raw[start:end].

    The header block is raw[start:header_end] and ends with its last line ending;
    no blank line means the whole span is headers.
    """
    if raw.startswith(b"\n", start, end):
        return start, start + 1
    if raw.startswith(b"\r\n", start, end):
        return start, start + 2
    m = _HEADER_END.search(raw, start, end)
    if m is None:
        return end, end
    return m.start() + 1, m.end()


def parse_headers(raw: bytes, start: int, end: int) -> tuple[HeaderField, ...]:
    """The header fields in raw[start:end]; lines that are not fields are skipped."""
    fields = []
    for m in _FIELD.finditer(raw, start, end):
        value = m.group(2)
        if b"\n" in value:
            value = _FOLD.sub(b"", value)
        fields.append(
            HeaderField(
                m.group(1).decode("ascii").lower(),
                value.decode("latin-1").strip(),
                m.start(),
                m.end(),
            )
        )
    return tuple(fields)


def first_value(headers: tuple[HeaderField, ...], name: str) -> str | None:
    for h in headers:
        if h.name == name:
            return h.value
    return None


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """("type/subtype", params) of a Content-Type value; text/plain when unusable.

    Parameter names are lower-cased, quoted values unquoted, RFC 2231
    continuations (``boundary*0=``, ``charset*=utf-8''...``) joined.
    """
    if value is None:
        return "text/plain", {}
    semi = value.find(";")
    mime_type = (value if semi < 0 else value[:semi]).strip().lower()
    params: dict[str, str] = {}
    if semi >= 0:
        pieces: dict[str, dict[int, tuple[str, bool]]] = {}
        for m in _PARAM.finditer(value, semi):
            name, raw = m.group(1).lower(), m.group(2)
            if raw.startswith('"'):
                raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1] if raw.endswith('"') else raw[1:])
            c = _CONTINUATION.match(name) if "*" in name else None
            if c is None:
                params.setdefault(name, raw)
            elif c.group(4) is not None:  # name*=charset'lang'value
                pieces.setdefault(c.group(4), {}).setdefault(0, (raw, True))
            else:
                pieces.setdefault(c.group(1), {}).setdefault(
                    int(c.group(2)[:6]), (raw, bool(c.group(3)))
                )
        for name, parts in pieces.items():
            if name not in params:
                params[name] = _join_rfc2231(parts)
    if not _MIME_TYPE.fullmatch(mime_type):
        return "text/plain", params
    return mime_type, params


def _join_rfc2231(parts: dict[int, tuple[str, bool]]) -> str:
    order = sorted(parts)
    out = []
    for i in order:
        raw, extended = parts[i]
        if extended:
            if i == order[0] and raw.count("'") >= 2:
                raw = raw.split("'", 2)[2]  # drop charset'language'
            raw = _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), raw)
        out.append(raw)
    return "".join(out)


def locate_part(raw: bytes, start: int, end: int) -> Part:
    """The part spanning raw[start:end]: its header block, headers and body span."""
    return _part(raw, start, end)


def _part(raw: bytes, start: int, end: int) -> Part:
    header_end, body_start = split_header_block(raw, start, end)
    headers = parse_headers(raw, start, header_end)
    content_type, params = parse_content_type(first_value(headers, "content-type"))
    cte = (first_value(headers, "content-transfer-encoding") or "7bit").strip().lower()
    disposition = (first_value(headers, "content-disposition") or "").split(";", 1)[0]
    return Part(
        start, header_end, body_start, end, headers, content_type, params,
        cte or "7bit", disposition.strip().lower(),
    )  # fmt: skip


def _delimiters(raw: bytes, boundary: bytes, start: int, end: int) -> list[tuple[int, int, bool]]:
    """The boundary lines in raw[start:end]: (line start, line end incl. EOL, is_close).

    A delimiter line is ``--boundary`` (``--boundary--`` for the close one) at a
    line start, followed only by transport padding (spaces, tabs) up to its line
    ending (RFC 2046 section 5.1.1). The list stops at the close delimiter.
    """
    delim = b"--" + boundary
    found: list[tuple[int, int, bool]] = []
    pos = start
    while True:
        i = raw.find(delim, pos, end)
        if i < 0:
            return found
        pos = i + len(delim)
        if i > 0 and raw[i - 1] != 0x0A:
            continue
        j = pos
        close = raw.startswith(b"--", j, end)
        if close:
            j += 2
        while j < end and raw[j] in b" \t":
            j += 1
        if j < end:
            if raw[j] == 0x0A:
                j += 1
            elif raw[j] == 0x0D and j + 1 < end and raw[j + 1] == 0x0A:
                j += 2
            else:
                continue
        found.append((i, j, close))
        if close:
            return found


def _eol_before(raw: bytes, i: int, floor: int) -> int:
    """Where the line ending just before raw[i] starts (i itself if none)."""
    if i - 2 >= floor and raw[i - 2 : i] == b"\r\n":
        return i - 2
    if i - 1 >= floor and raw[i - 1] == 0x0A:
        return i - 1
    return i


def walk(raw: bytes, root: Part | None = None) -> MimeWalk:
    """Every leaf part of the message, in order, at any multipart depth.

    message/rfc822 (and other message/*) parts are leaves: a forwarded mail is
    not ours to rewrite. A multipart with no boundary, or whose boundary never
    closes, is left whole (counted in ``broken``) -- guessing where its parts
    end could cut a part in two. ``root``, when given, is ``locate_part(raw, 0,
    len(raw))`` already made by the caller (saves parsing the top headers twice).
    """
    leaves: list[Part] = []
    problems: list[str] = []
    broken = 0
    stack: list[tuple[int, int, int]] = [(0, len(raw), 0)]
    while stack:
        start, end, depth = stack.pop()
        if root is not None and start == 0 and end == len(raw):
            part, root = root, None
        else:
            part = _part(raw, start, end)
        if not part.content_type.startswith("multipart/"):
            leaves.append(part)
            continue
        if part.is_attachment:
            continue
        boundary = part.params.get("boundary", "")
        if not boundary or len(boundary) > 200:
            broken += 1
            problems.append("multipart-no-boundary")
            continue
        if depth >= MAX_DEPTH:
            broken += 1
            problems.append("mime-too-deep")
            continue
        delims = _delimiters(raw, boundary.encode("latin-1"), part.body_start, end)
        if not delims or not delims[-1][2]:
            broken += 1
            problems.append("multipart-unclosed")
            continue
        children = []
        for (_, line_end, _close), (next_start, _, _) in itertools.pairwise(delims):
            child_end = max(line_end, _eol_before(raw, next_start, line_end))
            children.append((line_end, child_end, depth + 1))
        stack.extend(reversed(children))
    return MimeWalk(tuple(leaves), broken, tuple(problems))


# --- transfer encodings ----------------------------------------------------------

_QP_TRAILING_WS = re.compile(rb"[ \t]+(?=\r?\n|\Z)")
_QP_BAD = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r?\n|\Z)")
_B64_WS = b" \t\r\n"
_BARE_CR = re.compile(rb"\r(?!\n)")


def decode_body(encoding: str, body: bytes) -> bytes | None:
    """The decoded body, or None when it is not valid in its transfer encoding."""
    if encoding in ("7bit", "8bit", "binary"):
        return body
    if encoding == "quoted-printable":
        if _QP_BAD.search(body):
            # "=" then spaces then the line end: a soft break with transport padding
            # (RFC 2045 6.7 rule 3). Only stripped when needed: the regex is slow.
            body = _QP_TRAILING_WS.sub(b"", body)
            if _QP_BAD.search(body):
                return None
        return binascii.a2b_qp(body)
    if encoding == "base64":
        try:
            return binascii.a2b_base64(body.translate(None, _B64_WS), strict_mode=True)
        except binascii.Error:
            return None
    return None


def encode_qp(data: bytes, eol: bytes) -> bytes:
    """Quoted-printable, lines at most 76 characters, hard line breaks as ``eol``."""
    if _BARE_CR.search(data):  # one scan; two bytes.count calls cost 3x as much
        return _encode_qp_slow(data, eol)
    enc = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    # b2a_qp writes every line break in the style of the data's first one.
    if eol == b"\r\n":
        if b"\n" in enc and b"\r\n" not in enc:
            enc = enc.replace(b"\n", b"\r\n")
    elif b"\r\n" in enc:
        enc = enc.replace(b"\r\n", b"\n")
    return enc


def _encode_qp_slow(data: bytes, eol: bytes) -> bytes:
    """QP by hand, for data holding a bare CR (which b2a_qp would leave raw)."""
    return eol.join(_qp_line(line, eol) for line in re.split(rb"\r?\n", data))


def _qp_line(line: bytes, eol: bytes) -> bytes:
    out, col = [], 0
    for i, byte in enumerate(line):
        if (33 <= byte <= 126 and byte != 61) or (byte in (9, 32) and i < len(line) - 1):
            tok = bytes([byte])
        else:
            tok = b"=%02X" % byte
        if col + len(tok) > 75:
            out.append(b"=" + eol)
            col = 0
        out.append(tok)
        col += len(tok)
    return b"".join(out)


def encode_base64(data: bytes, eol: bytes) -> bytes:
    """Base64 in lines of 76 characters separated by ``eol`` (no final line ending)."""
    enc = binascii.b2a_base64(data, newline=False)
    return eol.join([enc[i : i + 76] for i in range(0, len(enc), 76)])


def has_long_line(data: bytes) -> bool:
    """Whether a line of ``data`` (line ending excluded) is longer than SMTP allows."""
    if len(data) <= MAX_LINE:
        return False
    return max(map(len, data.replace(b"\r\n", b"\n").split(b"\n"))) > MAX_LINE


# --- charsets ----------------------------------------------------------------------

# Codecs where a successful strict decode always encodes back to the same bytes.
_ROUND_TRIP_SAFE = frozenset({"utf-8", "ascii", "latin-1", "iso8859-1"})


def decode_text(data: bytes, charset: str | None) -> tuple[str, str] | str:
    """(text, codec) for ``data`` in ``charset``, or a short reason it can't be done.

    No charset or us-ascii: ASCII, then UTF-8, then Latin-1 are tried (mail
    labelled us-ascii often is not; Latin-1 keeps every byte, and links are
    ASCII). Any other charset must decode strictly and encode back to the very
    same bytes, so that everything we don't rewrite stays byte for byte.
    """
    if charset is None or not charset.strip():
        codec = "ascii"
    else:
        try:
            codec = codecs.lookup(charset.strip()[:64]).name
        except (LookupError, ValueError):
            return "charset-unknown"
    if codec == "ascii":
        for candidate in ("ascii", "utf-8"):
            try:
                return data.decode(candidate), candidate
            except UnicodeDecodeError:
                continue
        return data.decode("latin-1"), "latin-1"
    try:
        text = data.decode(codec)
    except LookupError:  # a bytes-to-bytes codec such as "base64" or "zlib"
        return "charset-unknown"
    except (UnicodeError, ValueError, TypeError):
        return "charset-undecodable"
    if codec not in _ROUND_TRIP_SAFE:
        try:
            if text.encode(codec) != data:
                return "charset-round-trip"
        except (UnicodeError, ValueError, TypeError):
            return "charset-round-trip"
    return text, codec
