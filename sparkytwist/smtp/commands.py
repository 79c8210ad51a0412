# -*- test-case-name: tests.test_smtp_replies -*-
"""Reading client commands (paths, parameters) and filtering the upstream's EHLO.

The proxy relays command lines byte for byte; it only parses what it needs:
the recipient (tokens carry it), the SIZE parameter, and the EHLO keywords it
must hide, change or add.
"""

from __future__ import annotations

import re

from sparkytwist.smtp.replies import Reply

_PATH = re.compile(
    rb"(?i)(?:MAIL\s+FROM|RCPT\s+TO):[ \t]*"
    rb"(<(?:[^<>\"\\]|\\.|\"(?:[^\"\\]|\\.)*\")*>|[^\s<>]+)"
    rb"(?:[ \t]+(.*))?\Z")
_SIZE = re.compile(rb"(?i)(?:^|\s)SIZE=(\d{1,20})(?:\s|\Z)")

#: EHLO keywords relayed as the upstream offered them: their commands are ones we
#: relay and their parameters ride on MAIL/RCPT, which we relay verbatim.
RELAYED_EXTENSIONS = frozenset({
    b"8BITMIME", b"SMTPUTF8", b"DSN", b"ENHANCEDSTATUSCODES", b"DELIVERBY", b"MT-PRIORITY",
    b"FUTURERELEASE", b"RRVS", b"NO-SOLICITING",
})


def parse_path(line: bytes) -> tuple[bytes, bytes] | None:
    """``(address, parameters)`` of a MAIL FROM / RCPT TO line; address without brackets."""
    m = _PATH.match(line)
    if m is None:
        return None
    path = m.group(1)
    if path.startswith(b"<"):
        path = path[1:-1]
        if b":" in path and path.startswith(b"@"):  # obsolete source route: @a,@b:user@c
            path = path.split(b":", 1)[1]
    return path, (m.group(2) or b"").strip()


def size_param(params: bytes) -> int | None:
    m = _SIZE.search(params)
    return int(m.group(1)) if m else None


def ehlo_keywords(reply: Reply) -> dict[bytes, bytes]:
    """Upper-cased keyword -> its parameters, from the lines after the first."""
    out: dict[bytes, bytes] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(b" ")
        if keyword.upper().startswith(b"AUTH="):  # old-style "AUTH=LOGIN PLAIN"
            keyword, params = b"AUTH", keyword[5:] + b" " + params
        out.setdefault(keyword.upper(), params.strip())
    return out


def filter_ehlo(
    upstream: Reply,
    *,
    greeting: bytes,
    max_size: int,
    starttls: bool,
    auth: bool,
) -> Reply:
    """Our EHLO reply: the upstream's extensions we can honour, our SIZE, our STARTTLS.

    Dropped: CHUNKING/BINARYMIME (we have no BDAT), the upstream's STARTTLS (that
    TLS is ours to use), AUTH unless allowed, and anything whose command we do not
    relay (XCLIENT, ETRN, ...). PIPELINING is always offered: we honour it ourselves.
    """
    keywords = ehlo_keywords(upstream)
    lines = [greeting, b"PIPELINING"]
    their_size = keywords.get(b"SIZE", b"")
    size = max_size
    if their_size.isdigit() and int(their_size) > 0:
        size = min(size, int(their_size))
    lines.append(b"SIZE %d" % size)
    for line in upstream.lines[1:]:
        keyword = line.strip().partition(b" ")[0].upper()
        if keyword in RELAYED_EXTENSIONS:
            lines.append(line)
    if auth and b"AUTH" in keywords and keywords[b"AUTH"]:
        lines.append(b"AUTH " + keywords[b"AUTH"])
    if starttls:
        lines.append(b"STARTTLS")
    return Reply(250, tuple(lines))
