# -*- test-case-name: tests.test_html -*-
"""Rewrite the links of a decoded HTML part and add the open pixels.

The HTML is never parsed into a tree and written back: a mail's HTML is often
hand-made or broken, and whatever a re-serialiser "fixes" can change how a mail
client shows it. Instead one compiled regex walks the text the way an HTML5
tokenizer does (comments, raw-text elements such as ``<script>``/``<style>``,
quoted attribute values that hold ``>``), stops only at the few tags that
matter (``<a>``, ``<area>``, ``<body>``, ``</head>``, ``</body>``,
``</html>``) and the output is the input with only the ``href`` value bytes
replaced and the pixel blocks inserted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from html import entities

from twisted.logger import Logger

_log = Logger()

#: ``make_url(action, url)``: the full tracking URL for an action ("c" with the
#: link's URL, "o"/"i"/"h" and the AMP ones with ``None``).
MakeUrl = Callable[[str, "str | None"], str]

# --- attribute values: HTML5 character references -------------------------

# HTML5 "numeric character reference end state": replacements for C1 controls
# (the Windows-1252 guess browsers make) -- 0x81, 0x8D, 0x8F, 0x90, 0x9D stay.
_C1_REPLACEMENTS = {
    0x80: "\u20ac", 0x82: "\u201a", 0x83: "\u0192", 0x84: "\u201e", 0x85: "\u2026",
    0x86: "\u2020", 0x87: "\u2021", 0x88: "\u02c6", 0x89: "\u2030", 0x8A: "\u0160",
    0x8B: "\u2039", 0x8C: "\u0152", 0x8E: "\u017d", 0x91: "\u2018", 0x92: "\u2019",
    0x93: "\u201c", 0x94: "\u201d", 0x95: "\u2022", 0x96: "\u2013", 0x97: "\u2014",
    0x98: "\u02dc", 0x99: "\u2122", 0x9A: "\u0161", 0x9B: "\u203a", 0x9C: "\u0153",
    0x9E: "\u017e", 0x9F: "\u0178",
}  # fmt: skip

_HTML5_ENTITIES = entities.html5
_CHARREF = re.compile(r"&(?:#[xX]([0-9A-Fa-f]+);?|#([0-9]+);?|([A-Za-z0-9]+;?))")
_LONGEST_ENTITY = max(len(k) for k in _HTML5_ENTITIES)
_ASCII_ALNUM_EQ = frozenset("=0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _numeric(number: int) -> str:
    if number == 0 or number > 0x10FFFF or 0xD800 <= number <= 0xDFFF:
        return "\ufffd"
    return _C1_REPLACEMENTS.get(number) or chr(number)


def decode_attribute(value: str) -> str:
    """Decode character references as an HTML5 browser does inside an attribute value.

    Unlike :func:`html.unescape` (which follows the rules for text), a named
    reference without its ``;`` that is followed by ``=`` or an ASCII letter or
    digit is *not* decoded: ``?a=1&region=eu`` keeps its ``&region``.
    """
    if "&" not in value:
        return value
    if value.count("&") == value.count("&amp;"):  # the common case in links
        return value.replace("&amp;", "&")
    out: list[str] = []
    pos = 0
    for m in _CHARREF.finditer(value):
        start, end = m.span()
        hexdigits, decdigits, name = m.groups()
        if hexdigits is not None or decdigits is not None:
            # Anything above 0x10FFFF becomes U+FFFD: don't int() a huge digit run.
            digits = (hexdigits or decdigits or "").lstrip("0") or "0"
            base = 16 if hexdigits is not None else 10
            text = _numeric(int(digits, base) if len(digits) <= 8 else 0x110000)
        else:
            found = _longest_entity(name)
            if found is None:
                continue
            text, used = found
            end = start + 1 + used
            if (
                not name[:used].endswith(";")
                and end < len(value)
                and (value[end] in _ASCII_ALNUM_EQ)
            ):
                continue  # "&region=" in an attribute: historical reasons, not decoded
        out.append(value[pos:start])
        out.append(text)
        pos = end
    if not out:
        return value
    out.append(value[pos:])
    return "".join(out)


def _longest_entity(name: str) -> tuple[str, int] | None:
    """The longest prefix of ``name`` that is a named reference: (text, length)."""
    if name in _HTML5_ENTITIES:
        return _HTML5_ENTITIES[name], len(name)
    bare = name.rstrip(";")
    for n in range(min(len(bare), _LONGEST_ENTITY), 1, -1):
        text = _HTML5_ENTITIES.get(bare[:n])
        if text is not None:
            return text, n
    return None


_URL_STRIP = "".join(chr(c) for c in range(0x21))  # C0 controls and space (URL spec)
_URL_TAB_NEWLINE = re.compile("[\t\n\r]")


def trackable_url(raw_value: str) -> str | None:
    """The URL a click on ``href=raw_value`` would open, if it is http(s); else None.

    Entities are decoded, leading/trailing C0 controls and spaces trimmed and
    tabs/newlines removed, as a browser's URL parser does; mailto:, tel:, #,
    relative links and template placeholders give None.
    """
    url = decode_attribute(raw_value).strip(_URL_STRIP)
    head = url[:8].lower()
    if not (head.startswith("http://") or head == "https://"):
        return None
    if "\t" in url or "\n" in url or "\r" in url:
        url = _URL_TAB_NEWLINE.sub("", url)
    return url


# --- the tokenizer -----------------------------------------------------------

_WS = r"[\t\n\f\r ]"
_NAME_END = r"(?=[\t\n\f\r />])"
# HTML5 attribute grammar (before/after attribute name, the three value states);
# possessive so a broken tag fails fast instead of backtracking.
_ATTRS = (
    r"(?:[\t\n\f\r /]++|[^\t\n\f\r />=][^\t\n\f\r />=]*+"
    r"(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+"
    r"""(?:"[^"]*+"|'[^']*+'|[^\t\n\f\r >"'][^\t\n\f\r >]*+|(?=>)))?)*+"""
)


def _interesting(named: bool) -> str:
    def g(name: str) -> str:
        return f"?P<{name}>" if named else "?:"

    return (
        rf"({g('link')}<(?:a|area){_NAME_END}({g('attrs')}{_ATTRS})>)"
        rf"|({g('body')}<body{_NAME_END}{_ATTRS}>)"
        rf"|({g('endbody')}</body{_NAME_END}{_ATTRS}>)"
        rf"|({g('endhead')}</head{_NAME_END}{_ATTRS}>)"
        rf"|({g('endhtml')}</html{_NAME_END}{_ATTRS}>)"
    )


# Start tags of the raw-text elements and the interesting tags: a generic tag is
# anything else. Written as a trie: this lookahead runs at every tag.
_SPECIAL = (
    rf"(?:a(?:rea)?|body|s(?:cript|tyle)|t(?:itle|extarea)|xmp|iframe|no(?:embed|frames))"
    rf"{_NAME_END}|/(?:body|head|html){_NAME_END}"
)
_NOT_NAME_END = r"\t\n\f\r />"
_PLAIN_NAME = (
    rf"(?:[c-hj-mo-ru-wyz]|a[^r{_NOT_NAME_END}]|b[^o{_NOT_NAME_END}]|i[^f{_NOT_NAME_END}]"
    rf"|n[^o{_NOT_NAME_END}]|s[^ct{_NOT_NAME_END}]|t[^ei{_NOT_NAME_END}]|x[^m{_NOT_NAME_END}]"
    rf"|/[ac-gi-z])"
)
_RAWTEXT = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
_SKIP = (
    r"[^<]++"
    # every other start or end tag (first: by far the most frequent). The first
    # alternative is the lookahead-free fast path for names that cannot be special
    # (td, tr, table, span, img, div, p, </td>, </a>, ...).
    rf"|<{_PLAIN_NAME}[^\t\n\f\r />]*+{_ATTRS}>"
    rf"|<(?!{_SPECIAL})/?[a-z][^\t\n\f\r />]*+{_ATTRS}>"
    # comments, including the abrupt "<!-->" / "<!--->" and "--!>" endings
    r"|<!--(?:-?>|(?:[^-]++|-(?!-!?>))*+(?:--!?>|\Z))"
    # raw-text elements: no tags inside, up to the matching end tag (one
    # alternative per name: a capturing group inside the possessive loop trips
    # a CPython 3.11 re bug)
    + "".join(
        rf"|<{name}{_NAME_END}{_ATTRS}>"
        rf"(?:[^<]++|<(?!/{name}{_NAME_END}))*+(?:</{name}{_NAME_END}{_ATTRS}>|\Z)"
        for name in _RAWTEXT
    )
    # doctype, <![CDATA[, <?...>, </3...>: bogus comments up to the next ">"
    + r"|<(?:!|\?|/(?![a-z]))[^>]*+(?:>|\Z)"
    # a "<" that starts nothing (or a tag that never closes) is text
    rf"|(?!{_interesting(named=False)})<"
)
_NEXT = re.compile(rf"(?:{_SKIP})*+(?:{_interesting(named=True)}|\Z)", re.IGNORECASE)
_ATTR = re.compile(
    r"([^\t\n\f\r />=][^\t\n\f\r />=]*+)"
    r"(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+"
    r"""(?:"([^"]*+)"|'([^']*+)'|([^\t\n\f\r >"'][^\t\n\f\r >]*+)|(?=>)))?"""
)
_UNQUOTED_UNSAFE = re.compile(r"""[\t\n\f\r "'=<>`]""")


# --- pixel blocks --------------------------------------------------------------


def _attr_value(url: str) -> str:
    """``url`` escaped for a double-quoted attribute value."""
    return url.replace("&", "&amp;").replace('"', "&quot;")


def initial_block(img_url: str | None, honeypot_url: str | None, *, amp: bool = False) -> str:
    """The hidden block put right after ``<body>``: initial_open pixel and honeypot link.

    The honeypot is a link no person can see or reach by keyboard; only a bot
    that follows every link clicks it, which marks that recipient's hits as a bot's.
    """
    inner = ""
    if img_url is not None:
        if amp:
            inner += f'<amp-img src="{_attr_value(img_url)}" width="1" height="1" alt=""></amp-img>'
        else:
            inner += (
                f'<img src="{_attr_value(img_url)}" width="1" height="1" alt="" border="0"'
                ' style="display:block;border:0;width:1px;height:1px">'
            )
    if honeypot_url is not None and not amp:
        inner += (
            f'<a href="{_attr_value(honeypot_url)}" tabindex="-1" aria-hidden="true"'
            ' style="display:none">&#8203;</a>'
        )
    if not inner:
        return ""
    if amp:
        return inner
    return (
        '<div aria-hidden="true" style="display:none;max-height:0;overflow:hidden;'
        'mso-hide:all;font-size:0;line-height:0">' + inner + "</div>"
    )


def open_pixel(img_url: str, *, amp: bool = False) -> str:
    """The open pixel put right before ``</body>``."""
    if amp:
        return f'<amp-img src="{_attr_value(img_url)}" width="1" height="1" alt=""></amp-img>'
    return (
        f'<img src="{_attr_value(img_url)}" width="1" height="1" alt="" border="0"'
        ' style="height:1px!important;width:1px!important;border-width:0!important;'
        'margin:0!important;padding:0!important">'
    )


# --- the rewrite -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HtmlRewrite:
    """The rewritten HTML and what was done to it."""

    text: str
    #: (start, end, new) spans of the input that were replaced, in order
    edits: tuple[tuple[int, int, str], ...]
    links: int  #: hrefs replaced by click-tracking URLs
    pixels: int  #: tracking images inserted (initial_open + open)
    failures: int  #: make_url calls that raised (that link/pixel left as it was)

    @property
    def changed(self) -> bool:
        return self.links > 0 or self.pixels > 0


def _link_edit(
    html: str, m: re.Match[str], make_url: MakeUrl, action: str
) -> tuple[int, int, str] | None:
    """(start, end, replacement) for the href value of one <a>/<area> tag, or None."""
    href: re.Match[str] | None = None
    for a in _ATTR.finditer(html, m.start("attrs"), m.end("attrs")):
        name = a.group(1)
        name = name.lower() if name.isascii() else name
        if name == "data-sparky-notrack":
            return None
        if name == "data-msys-clicktrack":
            raw = a.group(2) if a.group(2) is not None else (a.group(3) or a.group(4) or "")
            if decode_attribute(raw).strip() == "0":
                return None
        elif name == "href" and href is None:
            href = a  # HTML5 keeps the first of duplicate attributes
    if href is None:
        return None
    group = next((g for g in (2, 3, 4) if href.group(g) is not None), 0)
    if not group:
        return None
    raw = href.group(group)
    quote = {2: '"', 3: "'"}.get(group, "")
    url = trackable_url(raw)
    if url is None:
        return None
    start, end = href.span(group)
    new = make_url(action, url).replace("&", "&amp;")
    if quote == '"':
        new = new.replace('"', "&quot;")
    elif quote == "'":
        new = new.replace("'", "&#39;")
    elif _UNQUOTED_UNSAFE.search(new):
        new = '"' + new.replace('"', "&quot;") + '"'
    return start, end, new


def rewrite_html(
    html: str, *, make_url: MakeUrl, opens: bool, clicks: bool, amp: bool = False
) -> HtmlRewrite:
    """Track the http(s) links of ``html`` and add the open pixels.

    ``amp`` selects the AMP actions (ao/ai/ac) and ``<amp-img>`` pixels. Links
    marked ``data-sparky-notrack`` or ``data-msys-clicktrack="0"``, links in
    comments and in ``<script>``/``<style>`` are left alone.
    """
    click_action = "ac" if amp else "c"
    edits: list[tuple[int, int, str]] = []
    links = failures = 0
    body_end = head_end = html_end = -1
    after_body = -1
    pos = 0
    n = len(html)
    while pos <= n:
        m = _NEXT.match(html, pos)
        if m is None:  # pragma: no cover - the pattern always reaches a token or the end
            break
        pos = m.end()
        if m.start("link") >= 0:
            if not clicks:
                continue
            try:
                edit = _link_edit(html, m, make_url, click_action)
            except Exception:
                _log.failure("make_url failed for a link; link left as it is")
                failures += 1
                continue
            if edit is not None:
                edits.append(edit)
                links += 1
        elif m.start("body") >= 0:
            if after_body < 0:
                after_body = pos
        elif m.start("endbody") >= 0:
            body_end = m.start("endbody")
        elif m.start("endhead") >= 0:
            if head_end < 0:
                head_end = pos
        elif m.start("endhtml") >= 0:
            html_end = m.start("endhtml")
        else:  # matched the end of the text
            break
    pixels = 0
    if opens or (clicks and not amp):
        try:
            block = initial_block(
                make_url("ai" if amp else "i", None) if opens else None,
                make_url("h", None) if clicks and not amp else None,
                amp=amp,
            )
            opening = open_pixel(make_url("ao" if amp else "o", None), amp=amp) if opens else ""
        except Exception:
            _log.failure("make_url failed for a pixel; no pixels added")
            failures += 1
        else:
            at = after_body if after_body >= 0 else head_end if head_end >= 0 else 0
            close = body_end if body_end >= 0 else html_end if html_end >= 0 else n
            edits.append((at, at, block))
            if opening:
                edits.append((close, close, opening))
            pixels = 2 if opens else 0
    if not edits:
        return HtmlRewrite(html, (), links, pixels, failures)
    # Stable sort: at one position the initial block comes before the open pixel.
    edits.sort(key=lambda e: e[0])
    out: list[str] = []
    last = 0
    for start, end, new in edits:
        out.append(html[last:start])
        out.append(new)
        last = end
    out.append(html[last:])
    return HtmlRewrite("".join(out), tuple(edits), links, pixels, failures)
