# -*- test-case-name: tests.test_smtp_replies -*-
"""The ``Received:`` trace header (RFC 5321 section 4.4) we add to each copy.

Everything the client chose (HELO name, recipient) is cleaned of control
characters first: a CR or LF there would let a client inject headers.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime

_UNSAFE = re.compile(rb"[\x00-\x1f\x7f()\\;<>]")


def _clean(value: bytes, limit: int = 255) -> bytes:
    return _UNSAFE.sub(b"?", value)[:limit] or b"unknown"


def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 address literals)."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return f"[{ip}]" if ip else "[unknown]"
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return f"[{parsed.ipv4_mapped}]"
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


def protocol_name(*, esmtp: bool, tls: bool, authenticated: bool) -> str:
    """``SMTP``/``ESMTP`` with the RFC 3848 ``S`` (TLS) and ``A`` (AUTH) suffixes."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    *,
    helo: bytes,
    client_ip: str,
    hostname: str,
    protocol: str,
    message_id: str,
    rcpt: bytes,
    now: float,
) -> bytes:
    """The folded header (CRLF line ends, no final CRLF; the rewrite adds the message's)."""
    date = datetime.fromtimestamp(now, UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    return b"".join((
        b"Received: from ", _clean(helo), b" (", address_literal(client_ip).encode("ascii"), b")",
        b"\r\n\tby ", hostname.encode("idna" if not hostname.isascii() else "ascii"),
        b" (sparkytwist) with ", protocol.encode("ascii"), b" id ", message_id.encode("ascii"),
        b"\r\n\tfor <", _clean(rcpt, 998 - 20), b">; ", date.encode("ascii"),
    ))
