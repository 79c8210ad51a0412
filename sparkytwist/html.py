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
        rf"({g('link')}<(?i:a|area){_NAME_END}({g('attrs')}{_ATTRS})>)"
        rf"|({g('body')}<(?i:body){_NAME_END}{_ATTRS}>)"
        rf"|({g('endbody')}</(?i:body){_NAME_END}{_ATTRS}>)"
        rf"|({g('endhead')}</(?i:head){_NAME_END}{_ATTRS}>)"
        rf"|({g('endhtml')}</(?i:html){_NAME_END}{_ATTRS}>)"
    )


# Start tags of the raw-text elements and the interesting tags: a generic tag is
# anything else. Written as a trie: this lookahead runs at every tag.
_SPECIAL = (
    rf"(?i:a(?:rea)?|body|s(?:cript|tyle)|t(?:itle|extarea)|xmp|iframe|no(?:embed|frames))"
    rf"{_NAME_END}|/(?i:body|head|html){_NAME_END}"
)
_NOT_NAME_END = r"\t\n\f\r />"
# The alternatives start with different letters, so their order is free: end tags
# and t* (td, tr, table) first, the most frequent in mail, saves ~20% of the scan.
_PLAIN_NAME = (
    rf"(?i:/[ac-gi-z]|t[^ei{_NOT_NAME_END}]|[c-hj-mo-ru-wyz]|a[^r{_NOT_NAME_END}]"
    rf"|b[^o{_NOT_NAME_END}]|i[^f{_NOT_NAME_END}]|n[^o{_NOT_NAME_END}]|s[^ct{_NOT_NAME_END}]"
    rf"|x[^m{_NOT_NAME_END}])"
)
_RAWTEXT = ("script", "style", "title", "textarea", "xmp", "iframe", "noembed", "noframes")
_SKIP = (
    r"[^<]++"
    # every other start or end tag (first: by far the most frequent). The first
    # alternative is the lookahead-free fast path for names that cannot be special
    # (td, tr, table, span, img, div, p, </td>, </a>, ...).
    rf"|<{_PLAIN_NAME}[^\t\n\f\r />]*+{_ATTRS}>"
    rf"|<(?!{_SPECIAL})/?(?i:[a-z])[^\t\n\f\r />]*+{_ATTRS}>"
    # comments, including the abrupt "<!-->" / "<!--->" and "--!>" endings
    r"|<!--(?:-?>|(?:[^-]++|-(?!-!?>))*+(?:--!?>|\Z))"
    # raw-text elements: no tags inside, up to the matching end tag (one
    # alternative per name: a capturing group inside the possessive loop trips
    # a CPython 3.11 re bug)
    + "".join(
        rf"|<(?i:{name}){_NAME_END}{_ATTRS}>"
        rf"(?:[^<]++|<(?!/(?i:{name}){_NAME_END}))*+(?:</(?i:{name}){_NAME_END}{_ATTRS}>|\Z)"
        for name in _RAWTEXT
    )
    # doctype, <![CDATA[, <?...>, </3...>: bogus comments up to the next ">"
    + r"|<(?:!|\?|/(?!(?i:[a-z])))[^>]*+(?:>|\Z)"
    # a "<" that starts nothing (or a tag that never closes) is text
    rf"|(?!{_interesting(named=False)})<"
)
# Case-insensitive only where letters are matched ((?i:...) around every tag name,
# same folding as before): a global re.IGNORECASE folds case in every character
# class too, text and attribute values included.
_NEXT = re.compile(rf"(?:{_SKIP})*+(?:{_interesting(named=True)}|\Z)")
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


#: One href value to replace: (start, end, url, quote) -- quote is '"', "'" or "".
_Link = tuple[int, int, str, str]


def _find_link(html: str, m: re.Match[str]) -> _Link | None:
    """The href value of one <a>/<area> tag to track, or None."""
    href: re.Match[str] | None = None
    start, end = m.span("attrs")
    first = _ATTR.search(html, start, end)
    if (
        first is not None
        and len(first[1]) == 4
        and first[1].isascii()
        and first[1].lower() == "href"
        and "data-" not in html[start:end].lower()
    ):
        # The usual <a href=... style=...>: href comes first and no attribute can be
        # a no-track marker, so the other attributes need not be looked at.
        href = first
    else:
        href = _first_href(html, start, end)
        if href is None:
            return None
    group = href.lastindex
    if group is None or group < 2:
        return None
    url = trackable_url(href[group])
    if url is None:
        return None
    start, end = href.span(group)
    return start, end, url, '"' if group == 2 else "'" if group == 3 else ""


def _first_href(html: str, start: int, end: int) -> re.Match[str] | None:
    """The first href attribute in html[start:end]; None if there is none or a no-track marker."""
    href: re.Match[str] | None = None
    for a in _ATTR.finditer(html, start, end):
        name = a[1]
        # Only three names matter: compare lengths before lower-casing. Non-ASCII
        # names are not lower-cased (U+212A KELVIN SIGN.lower() is "k").
        size = len(name)
        if size == 4:
            if href is None and name.isascii() and name.lower() == "href":
                href = a  # HTML5 keeps the first of duplicate attributes
        elif size in {19, 20} and name.isascii():
            name = name.lower()
            if name == "data-sparky-notrack":
                return None
            if name == "data-msys-clicktrack":
                # _ATTR's groups 2-4 are the three value forms; lastindex says which
                value = a.lastindex
                raw = a[value] if value is not None and value > 1 else ""
                if decode_attribute(raw).strip() == "0":
                    return None
    return href


def _href_value(url: str, quote: str) -> str:
    """A tracking URL written as an href value in the link's quoting style."""
    new = url.replace("&", "&amp;")
    if quote == '"':
        return new.replace('"', "&quot;")
    if quote == "'":
        return new.replace("'", "&#39;")
    if _UNQUOTED_UNSAFE.search(new):
        return '"' + new.replace('"', "&quot;") + '"'
    return new


@dataclass(frozen=True, slots=True)
class HtmlScan:
    """Where the tracking goes in one HTML text: everything but the URLs themselves.

    Scanning is most of the cost of :func:`rewrite_html` and does not depend on
    the recipient, so a message sent to several recipients is scanned once and
    :meth:`rewrite` is called once per recipient.
    """

    html: str
    links: tuple[_Link, ...]  #: the href values to replace, in order
    scan_failures: int  #: links whose scan raised (counted as failures, left alone)
    pixel_at: int  #: where the initial block goes
    close_at: int  #: where the open pixel goes
    opens: bool
    clicks: bool
    amp: bool

    def rewrite(self, make_url: MakeUrl) -> HtmlRewrite:
        """The HTML with this recipient's URLs: what :func:`rewrite_html` returns."""
        html, amp, opens, clicks = self.html, self.amp, self.opens, self.clicks
        click_action = "ac" if amp else "c"
        edits: list[tuple[int, int, str]] = []
        links = 0
        failures = self.scan_failures
        for start, end, url, quote in self.links:
            try:
                new = _href_value(make_url(click_action, url), quote)
            except Exception:
                _log.failure("make_url failed for a link; link left as it is")
                failures += 1
                continue
            edits.append((start, end, new))
            links += 1
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
                at, close = self.pixel_at, self.close_at
                # Insert in order (links are in order and none holds these points):
                # at one position the initial block comes before the open pixel.
                edits.append((at, at, block))
                if opening:
                    edits.append((close, close, opening))
                pixels = 2 if opens else 0
        if not edits:
            return HtmlRewrite(html, (), links, pixels, failures)
        edits.sort(key=_edit_start)  # stable
        out: list[str] = []
        last = 0
        for start, end, new in edits:
            out.append(html[last:start])
            out.append(new)
            last = end
        out.append(html[last:])
        return HtmlRewrite("".join(out), tuple(edits), links, pixels, failures)


def _edit_start(edit: tuple[int, int, str]) -> int:
    return edit[0]


def scan_html(html: str, *, opens: bool, clicks: bool, amp: bool = False) -> HtmlScan:
    """Find the links to track and the pixel positions of ``html`` (see rewrite_html)."""
    found: list[_Link] = []
    failures = 0
    body_end = head_end = html_end = -1
    after_body = -1
    pos = 0
    n = len(html)
    while pos <= n:
        m = _NEXT.match(html, pos)
        if m is None:  # pragma: no cover - the pattern always reaches a token or the end
            break
        pos = m.end()
        kind = m.lastgroup  # the outermost named group that matched; None at the end
        if kind == "link":
            if not clicks:
                continue
            try:
                link = _find_link(html, m)
            except Exception:
                _log.failure("make_url failed for a link; link left as it is")
                failures += 1
                continue
            if link is not None:
                found.append(link)
        elif kind == "body":
            if after_body < 0:
                after_body = pos
        elif kind == "endbody":
            body_end = m.start("endbody")
        elif kind == "endhead":
            if head_end < 0:
                head_end = pos
        elif kind == "endhtml":
            html_end = m.start("endhtml")
        else:  # matched the end of the text
            break
    at = after_body if after_body >= 0 else head_end if head_end >= 0 else 0
    close = body_end if body_end >= 0 else html_end if html_end >= 0 else n
    return HtmlScan(html, tuple(found), failures, at, close, opens, clicks, amp)


def rewrite_html(
    html: str, *, make_url: MakeUrl, opens: bool, clicks: bool, amp: bool = False
) -> HtmlRewrite:
    """Track the http(s) links of ``html`` and add the open pixels.

    ``amp`` selects the AMP actions (ao/ai/ac) and ``<amp-img>`` pixels. Links
    marked ``data-sparky-notrack`` or ``data-msys-clicktrack="0"``, links in
    comments and in ``<script>``/``<style>`` are left alone.
    """
    return scan_html(html, opens=opens, clicks=clicks, amp=amp).rewrite(make_url)
