# -*- test-case-name: tests.test_tracker_parts -*-
"""A click's target URL as the ``Location`` a browser would request.

The token keeps the URL as the sender wrote it (possibly an IRI: unicode host,
path, query). A ``Location`` header must be ASCII, so the host becomes IDNA
(UTS #46, as browsers do) and every other non-ASCII or unsafe character is
percent-encoded as UTF-8 with the WHATWG URL percent-encode set of its component.
Everything already ASCII and safe stays byte for byte: ``&``, ``%xx``, ``+``,
``#fragment`` and the order of the query are never touched.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

#: Characters a browser would percent-encode, per component (plus all non-ASCII, C0, DEL).
_PATH_UNSAFE = ' "<>`{}'
_QUERY_UNSAFE = " \"<>'"
_FRAGMENT_UNSAFE = ' "<>`'
_USERINFO_UNSAFE = ' "<>`{}/;=@[\\]^|'
_CLEAN = re.compile(r"^[\x21\x23-\x26\x28-\x3b\x3d\x3f-\x5f\x61-\x7a\x7c\x7e]*$")


def _encode(text: str, unsafe: str) -> str:
    if _CLEAN.match(text) and not any(c in unsafe for c in text):
        return text
    return "".join(
        quote(c, safe="") if (c in unsafe or ord(c) <= 0x20 or ord(c) >= 0x7F) else c
        for c in text)


def _idna_host(host: str) -> str:
    if host.isascii():
        return host
    import idna

    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError:
        try:
            return host.encode("idna").decode("ascii")
        except UnicodeError:
            return quote(host, safe="")


def to_uri(url: str) -> str:
    """``url`` with an IDNA host and percent-encoded non-ASCII; ASCII URLs unchanged."""
    if _CLEAN.match(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return _encode(url, _QUERY_UNSAFE)
    netloc = parts.netloc
    if (netloc and not netloc.isascii()) or any(c in netloc for c in ' "<>`'):
        userinfo, at, hostport = netloc.rpartition("@")
        host, port = hostport, ""
        if not hostport.endswith("]"):
            head, colon, tail = hostport.rpartition(":")
            if colon and tail.isdigit():
                host, port = head, ":" + tail
        user, colon, password = userinfo.partition(":")
        credentials = _encode(user, _USERINFO_UNSAFE + ":") + colon + _encode(
            password, _USERINFO_UNSAFE + ":") + at
        netloc = credentials + _idna_host(host) + port
    out = f"{parts.scheme}://{netloc}" if parts.scheme else netloc
    out += _encode(parts.path, _PATH_UNSAFE)
    if "?" in url.split("#", 1)[0]:
        out += "?" + _encode(parts.query, _QUERY_UNSAFE)
    if "#" in url:
        out += "#" + _encode(parts.fragment, _FRAGMENT_UNSAFE)
    return out
