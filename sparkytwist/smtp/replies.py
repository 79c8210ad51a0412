# -*- test-case-name: tests.test_smtp_replies -*-
"""SMTP replies: parsed from the upstream (multi-line) and written to the client.

Replies are kept as their code and text lines so they can be relayed verbatim
(enhanced status codes included) or rebuilt after filtering, as EHLO needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ReplyError(ValueError):
    """A reply line that is not ``NNN``, ``NNN text`` or ``NNN-text``."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[bytes, ...] = (b"",)
    #: the bytes as received, when parsed: relayed byte for byte
    raw: bytes | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, code: int, *lines: str) -> Reply:
        """A reply we write ourselves (ASCII text)."""
        return cls(code, tuple(s.encode("ascii") for s in lines) or (b"",))

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> bytes:
        """All text lines joined by spaces (for logs and exception messages)."""
        return b" ".join(self.lines)

    def to_bytes(self) -> bytes:
        if self.raw is not None:
            return self.raw
        code = b"%03d" % self.code
        last = len(self.lines) - 1
        out = []
        for i, line in enumerate(self.lines):
            sep = b" " if i == last else b"-"
            out.append(code + sep + line + b"\r\n" if line or i != last else code + b"\r\n")
        return b"".join(out)

    def __str__(self) -> str:
        return f"{self.code} {self.text.decode('utf-8', 'replace')}"


class ReplyParser:
    """Collects reply lines until the final one (``NNN`` followed by a space or nothing)."""

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[bytes] = []
        self._raw: list[bytes] = []

    def feed(self, line: bytes) -> Reply | None:
        """One line without its CRLF; the reply when it was the last line, else None."""
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
            raise ReplyError(f"malformed reply line {line[:40]!r}")
        code = int(line[:3])
        if not 200 <= code <= 599 and not 100 <= code < 200:
            raise ReplyError(f"reply code out of range: {code}")
        if self._code is not None and code != self._code:
            raise ReplyError(f"reply code changed inside a multi-line reply: {code}")
        self._code = code
        self._lines.append(line[4:])
        self._raw.append(line)
        if line[3:4] == b"-":
            return None
        reply = Reply(code, tuple(self._lines), b"\r\n".join(self._raw) + b"\r\n")
        self._code, self._lines, self._raw = None, [], []
        return reply
