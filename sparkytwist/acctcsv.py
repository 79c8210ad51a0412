# -*- test-case-name: tests.test_acctcsv -*-
"""PowerMTA accounting CSV, parsed incrementally: bytes in, records out, no I/O.

PowerMTA writes its accounting stream as RFC 4180 CSV. The first line is a header
naming the fields; PMTA sends a header again whenever the pipe restarts and the field
order may change, so any record whose first field is literally ``type`` replaces the
current header. Data arrives in arbitrary chunks, so a record may be split anywhere,
even inside a quoted field or between CR and LF.

A bad line must never stop the stream (DESIGN.md, etl: "a malformed line is logged
and counted, never fatal"), and no line may make us buffer without bound. So:

* a malformed record (wrong field count, bad quoting, a bare CR, invalid UTF-8) is
  counted, described in :attr:`AccountingParser.last_problem`, and parsing resumes
  at the first line end after the point where the record went wrong;
* a record of ``max_record_bytes`` or more (its bytes up to, not including, the LF)
  is dropped and parsing resumes at the first LF at least ``max_record_bytes`` after
  the record's start. Past that point quoting is no longer trusted: that is what
  bounds an unterminated quote, which could otherwise swallow the rest of the stream.

Where a record ends depends only on the bytes, never on how they were chunked: feeding
the stream in any pieces gives the same records, counts and problems as feeding it at
once.

Speed: most lines hold no quote at all; they are decoded per chunk and split with
``str.split``. Lines with quotes go through the C ``csv`` module in strict mode, and a
regular expression checks the rare line where a quote ends up inside a field value.
"""

from __future__ import annotations

import csv
import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

#: The record types PowerMTA writes: delivered, bounced, transient (a deferral),
#: transient-queue, received, feedback loop, remote bounce, remote status.
RECORD_TYPES = frozenset({"d", "b", "t", "tq", "r", "f", "rb", "rs"})
#: ``ParseCounts.by_type`` key for any other type, so garbage can't grow the dict.
OTHER_TYPE = "other"

#: The first field of a header line.
HEADER_MARK = "type"

DEFAULT_MAX_RECORD_BYTES = 65536
_MIN_RECORD_BYTES = 64


class Problem(enum.StrEnum):
    """Why a record was not returned (keys of ``ParseCounts.malformed_by_reason``)."""

    FIELD_COUNT = "field-count"
    BAD_QUOTING = "bad-quoting"
    BARE_CR = "bare-cr"
    INVALID_UTF8 = "invalid-utf8"
    TOO_LONG = "too-long"
    UNTERMINATED = "unterminated-quote"


# RFC 4180 fields. Possessive quantifiers: inside quotes `""` is always an escaped
# quote, so there is nothing to backtrack into (and no catastrophic backtracking).
_FIELD = r'(?:"(?:[^"]|"")*+"|[^",\r\n]*+)'
#: A whole record, without its line terminator.
_BODY = re.compile(_FIELD + r"(?:," + _FIELD + r")*+")
#: A line that ends inside a quoted field: the start of a multi-line record.
_OPEN = re.compile(r"(?:" + _FIELD + r",)*+" + r'"(?:[^"]|"")*+')


@dataclass(slots=True)
class ParseCounts:
    """What the parser has seen so far; the etl exports these as metrics."""

    records: int = 0  #: data records returned
    headers: int = 0  #: header lines (first one and every re-sent one)
    malformed: int = 0  #: records dropped as malformed (all reasons)
    before_header: int = 0  #: data records dropped because no header came before them
    blank: int = 0  #: empty lines, ignored
    by_type: dict[str, int] = field(default_factory=dict)
    malformed_by_reason: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> ParseCounts:
        """A copy that later parsing won't change."""
        return ParseCounts(
            self.records,
            self.headers,
            self.malformed,
            self.before_header,
            self.blank,
            dict(self.by_type),
            dict(self.malformed_by_reason),
        )


class _FactIndex(NamedTuple):
    """Positions of the fields :func:`delivery_facts` reads (-1: not in the header)."""

    message_id: int
    rcpt: int
    orig: int
    job_id: int
    x_job: int
    subaccount: int
    source_ip: int
    pool: int
    time_logged: int


class Header:
    """The field names of one header line, looked up exactly or case-insensitively.

    A name that appears twice (PMTA can repeat a column) refers to its first column.
    """

    __slots__ = ("_exact", "_facts", "_folded", "_times", "names", "width")

    def __init__(self, names: Sequence[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.width = len(self.names)
        self._exact: dict[str, int] = {}
        self._folded: dict[str, int] = {}
        for i, name in enumerate(self.names):
            self._exact.setdefault(name, i)
            self._folded.setdefault(name.lower(), i)
        self._facts: _FactIndex | None = None
        self._times: dict[str, int | None] = {}  # timeLogged memo for delivery_facts

    def position(self, name: str) -> int:
        """The column of ``name`` (any letter case), or -1."""
        i = self._exact.get(name)
        if i is None:
            return self._folded.get(name.lower(), -1)
        return i

    @property
    def fact_index(self) -> _FactIndex:
        if self._facts is None:
            p = self.position
            self._facts = _FactIndex(
                message_id=p("header_x-sp-message-id"),
                rcpt=p("rcpt"),
                orig=p("orig"),
                job_id=p("jobId"),
                x_job=p("header_x-job"),
                subaccount=p("header_x-sp-subaccount-id"),
                source_ip=p("dlvSourceIp"),
                pool=p("vmtaPool"),
                time_logged=p("timeLogged"),
            )
        return self._facts

    def __repr__(self) -> str:
        return f"Header({list(self.names)!r})"


class Record(Mapping[str, str]):
    """One data line: field name (matched case-insensitively) → value.

    It keeps the parsed values and a reference to the header they belong to, which is
    much cheaper than building a dict for every line.
    """

    __slots__ = ("_header", "_values")

    def __init__(self, header: Header, values: list[str]) -> None:
        self._header = header
        self._values = values

    @property
    def type(self) -> str:
        """The record type: ``d``, ``b``, ``t``, ``tq``, ``r``, ``f``, ``rb``, ``rs``…"""
        return self._values[0]

    @property
    def header(self) -> Header:
        return self._header

    @property
    def raw(self) -> tuple[str, ...]:
        """The values in header order."""
        return tuple(self._values)

    def __getitem__(self, name: str) -> str:
        i = self._header.position(name)
        if i < 0:
            raise KeyError(name)
        return self._values[i]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        i = self._header.position(name)
        return default if i < 0 else self._values[i]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._header.position(name) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._header._exact)

    def __len__(self) -> int:
        return len(self._header._exact)

    def __repr__(self) -> str:
        return f"Record({dict(self)!r})"


class AccountingParser:
    """Turns PMTA accounting bytes, in chunks of any size, into :class:`Record`s.

    ``feed`` returns the records completed by a chunk; ``finish`` (at end of input)
    returns the last record if it lacked its line end. ``counts`` and
    ``last_problem`` say what was skipped and why, for metrics and rate-limited logs.
    """

    def __init__(self, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        if max_record_bytes < _MIN_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be at least {_MIN_RECORD_BYTES}")
        self._max = max_record_bytes
        self._pending = b""  # start of a record whose end has not arrived yet
        self._discarding = False  # dropping an oversize record up to the next LF
        self._header: Header | None = None
        self.counts = ParseCounts()
        #: A short description of the last malformed record (no field values: they
        #: hold addresses). Empty until something goes wrong.
        self.last_problem = ""
        # Strict csv reader over a one-slot stack: push a record, pull its fields.
        # It carries on after an error, so one reader serves the whole stream.
        self._csv_input: list[str] = []
        self._csv = csv.reader(iter(self._csv_input.pop, None), strict=True)

    @property
    def header(self) -> Header | None:
        """The header in force, if one has been seen."""
        return self._header

    @property
    def buffered(self) -> int:
        """Bytes held for a record whose end has not arrived (< ``max_record_bytes``)."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Record]:
        """Parse a chunk; return the records it completes, in order."""
        out: list[Record] = []
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return out
            data = data[nl + 1 :]
            self._discarding = False
        buf = self._pending + data if self._pending else data
        limit = self._max
        while True:
            used = self._scan(buf, out)
            if len(buf) - used < limit:
                self._pending = buf[used:]
                return out
            # The unfinished record is already too long: drop it, resync at an LF.
            self._problem(Problem.TOO_LONG, f"record of {limit} bytes or more")
            nl = buf.find(b"\n", used + limit)
            if nl < 0:
                self._pending = b""
                self._discarding = True
                return out
            buf = buf[nl + 1 :]

    def finish(self) -> list[Record]:
        """End of input: return the last record if it had no line end."""
        out: list[Record] = []
        if self._pending:
            out = self.feed(b"\n")
            if self._pending:
                self._problem(Problem.UNTERMINATED, "input ended inside a quoted field")
                self._pending = b""
        self._discarding = False
        return out

    # -- internals --------------------------------------------------------------

    def _problem(self, reason: Problem, detail: str) -> None:
        c = self.counts
        c.malformed += 1
        key = reason.value
        c.malformed_by_reason[key] = c.malformed_by_reason.get(key, 0) + 1
        self.last_problem = f"{reason}: {detail}"

    def _scan(self, buf: bytes, out: list[Record]) -> int:
        """Emit every complete record in ``buf``; return how many bytes were used."""
        end = buf.rfind(b"\n") + 1
        if not end:
            return 0
        region = buf[:end]
        bad: frozenset[int] | None = None
        try:
            text = region.decode("utf-8")
        except UnicodeDecodeError:
            text = region.decode("utf-8", "surrogateescape")
            bad = _undecodable_lines(region)
        ascii_only = text.isascii()
        lines = text.split("\n")
        n = len(lines) - 1  # the last element is the empty string after the final LF
        limit = self._max
        # Below this many characters a line can't reach the limit in bytes.
        quick = limit if ascii_only else limit // 4
        counts = self.counts
        by_type = counts.by_type
        header = self._header
        width = header.width if header is not None else -1
        problem = self._problem
        records = 0
        i = 0
        while i < n:
            line = lines[i]
            if len(line) >= quick and _blen(line, ascii_only) >= limit:
                problem(Problem.TOO_LONG, f"record of {limit} bytes or more")
                i += 1
                continue
            quoted = '"' in line
            if bad is not None and i in bad and (not quoted or line.count('"') % 2 == 0):
                # (a line that opens a multi-line field is checked as the whole record)
                problem(Problem.INVALID_UTF8, "record is not valid UTF-8")
                i += 1
                continue
            if not quoted:
                # The common case: a whole record on one line, no quoting.
                i += 1
                if line.endswith("\r"):
                    line = line[:-1]
                if not line:
                    counts.blank += 1
                    continue
                if "\r" in line:
                    problem(Problem.BARE_CR, "carriage return inside an unquoted field")
                    continue
                values = line.split(",")
            elif line.count('"') % 2 == 0:
                # Quotes, balanced: still a single-line record.
                i += 1
                parsed = self._parse_quoted(line[:-1] if line.endswith("\r") else line)
                if isinstance(parsed, tuple):
                    problem(*parsed)
                    continue
                values = parsed
            else:
                # An odd number of quotes: the line ends inside a quoted field (or the
                # quoting is broken). Gather lines until the quotes balance.
                if not _OPEN.fullmatch(line):
                    problem(Problem.BAD_QUOTING, "stray quote in a field")
                    i += 1
                    continue
                quotes = line.count('"')
                j = i + 1
                while j < n and quotes % 2:
                    quotes += lines[j].count('"')
                    j += 1
                if quotes % 2:
                    # Its end has not arrived yet: keep it from its first line.
                    counts.records += records
                    return _byte_offset(lines, i, ascii_only)
                joined = "\n".join(lines[i:j])
                if _blen(joined, ascii_only) >= limit:
                    problem(Problem.TOO_LONG, f"record of {limit} bytes or more")
                    i = _resync_line(lines, i, j, limit, ascii_only)
                    continue
                if bad is not None and not bad.isdisjoint(range(i, j)):
                    problem(Problem.INVALID_UTF8, "record is not valid UTF-8")
                    i = j
                    continue
                body = joined[:-1] if joined.endswith("\r") else joined
                parsed = self._parse_quoted(body)
                if isinstance(parsed, tuple):
                    problem(*parsed)
                    # Resume after the line where the record went wrong.
                    m = _BODY.match(body)
                    stop = m.end() if m else 0
                    i += body.count("\n", 0, stop) + 1
                    continue
                values = parsed
                i = j

            kind = values[0]
            if kind == HEADER_MARK:
                header = self._header = Header(values)
                width = header.width
                counts.headers += 1
            elif header is None:
                counts.before_header += 1
            elif len(values) != width:
                problem(Problem.FIELD_COUNT, f"{len(values)} fields, header has {width}")
            else:
                out.append(Record(header, values))
                records += 1
                if kind in RECORD_TYPES:
                    by_type[kind] = by_type.get(kind, 0) + 1
                else:
                    by_type[OTHER_TYPE] = by_type.get(OTHER_TYPE, 0) + 1
        counts.records += records
        return end

    def _parse_quoted(self, body: str) -> list[str] | tuple[Problem, str]:
        """Fields of a record holding quotes, or why it is malformed."""
        self._csv_input.append(body)
        try:
            values = next(self._csv)
        except IndexError:
            # A stray quote made the line look balanced while csv saw a quoted
            # field left open, and asked our empty stack for the next line.
            self._csv = csv.reader(iter(self._csv_input.pop, None), strict=True)
            return (Problem.BAD_QUOTING, "stray quote in a field")
        except csv.Error as e:
            self._csv_input.clear()
            msg = str(e)
            if "new-line" in msg:
                return (Problem.BARE_CR, "carriage return inside an unquoted field")
            if "field larger" in msg:
                return (Problem.TOO_LONG, "field larger than the csv module's limit")
            return (Problem.BAD_QUOTING, msg)
        # csv keeps a quote that is not at the start of a field as a literal
        # character; RFC 4180 doesn't allow it. Only a value holding a quote needs
        # the slower exact check.
        if '"' in "".join(values) and not _BODY.fullmatch(body):
            return (Problem.BAD_QUOTING, "stray quote in a field")
        return values


def _blen(text: str, ascii_only: bool) -> int:
    """Length in bytes of text decoded from UTF-8 (with surrogateescape)."""
    return len(text) if ascii_only else len(text.encode("utf-8", "surrogateescape"))


def _byte_offset(lines: list[str], i: int, ascii_only: bool) -> int:
    """Where line ``i`` starts, in bytes."""
    return sum(_blen(line, ascii_only) for line in lines[:i]) + i


def _resync_line(lines: list[str], i: int, j: int, limit: int, ascii_only: bool) -> int:
    """After an oversize record spanning lines i..j-1: the first line that starts
    after an LF at least ``limit`` bytes from the record's start (the same point a
    chunked feed reaches)."""
    pos = -1
    for k in range(i, j):
        pos += _blen(lines[k], ascii_only) + 1  # the LF that ends line k
        if pos >= limit:
            return k + 1
    return j


def _undecodable_lines(region: bytes) -> frozenset[int]:
    bad = []
    for k, chunk in enumerate(region.split(b"\n")):
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(k)
    return frozenset(bad)


# -- delivery facts -------------------------------------------------------------

#: Longest message id accepted from the accounting stream.
MAX_MESSAGE_ID = 64
#: How many distinct timeLogged values a header remembers (see delivery_facts).
_TIME_MEMO = 64


class SkipReason(enum.StrEnum):
    """Why a record gave no delivery facts (for the etl's skip counters)."""

    NOT_DELIVERY = "not-delivery"
    NO_MESSAGE_ID = "no-message-id"
    BAD_MESSAGE_ID = "bad-message-id"
    NO_RCPT = "no-rcpt"


@dataclass(frozen=True, slots=True)
class DeliveryFacts:
    """What a ``d`` record tells us about one (message id, recipient) delivery.

    Text fields are ``""`` when the accounting stream doesn't carry them.
    """

    message_id: str
    rcpt: str  #: as PMTA logged it, without angle brackets
    friendly_from: str  #: ``orig``, the envelope sender
    campaign_id: str  #: ``jobId``, else the ``X-Job`` header
    subaccount_id: int | None  #: ``X-Sp-Subaccount-Id`` if it is a decimal number
    sending_ip: str  #: ``dlvSourceIp``
    ip_pool: str  #: ``vmtaPool``
    routing_domain: str  #: the recipient's domain, lowercased
    delivered_at: int | None  #: ``timeLogged`` in unix seconds, if it could be read


def delivery_facts(record: Record) -> DeliveryFacts | None:
    """The delivery facts of a ``d`` record with a usable message id and recipient.

    None otherwise; :func:`skip_reason` says why. This runs once per delivery, so
    it reads the values by the positions its header worked out once.
    """
    v = record._values
    if v[0] != "d":
        return None
    header = record._header
    ix = header.fact_index
    message_id = v[ix.message_id].strip() if ix.message_id >= 0 else ""
    if not valid_message_id(message_id):
        return None
    rcpt = _bare_rcpt(v[ix.rcpt]) if ix.rcpt >= 0 else ""
    if not rcpt:
        return None
    campaign = v[ix.job_id] if ix.job_id >= 0 else ""
    if not campaign and ix.x_job >= 0:
        campaign = v[ix.x_job]
    delivered_at = None
    if ix.time_logged >= 0:
        # Thousands of records share each second: remember the last few.
        stamp = v[ix.time_logged]
        times = header._times
        if stamp in times:
            delivered_at = times[stamp]
        else:
            delivered_at = parse_pmta_time(stamp)
            if len(times) >= _TIME_MEMO:
                times.clear()
            times[stamp] = delivered_at
    return DeliveryFacts(
        message_id,
        rcpt,
        v[ix.orig] if ix.orig >= 0 else "",
        campaign.strip(),
        parse_subaccount(v[ix.subaccount]) if ix.subaccount >= 0 else None,
        v[ix.source_ip] if ix.source_ip >= 0 else "",
        v[ix.pool] if ix.pool >= 0 else "",
        rcpt[rcpt.rfind("@") + 1 :].lower() if "@" in rcpt else "",
        delivered_at,
    )


def skip_reason(record: Record) -> SkipReason | None:
    """Why :func:`delivery_facts` gives None for this record (None if it doesn't)."""
    v = record._values
    if v[0] != "d":
        return SkipReason.NOT_DELIVERY
    ix = record._header.fact_index
    message_id = v[ix.message_id].strip() if ix.message_id >= 0 else ""
    if not message_id:
        return SkipReason.NO_MESSAGE_ID
    if not valid_message_id(message_id):
        return SkipReason.BAD_MESSAGE_ID
    if not (_bare_rcpt(v[ix.rcpt]) if ix.rcpt >= 0 else ""):
        return SkipReason.NO_RCPT
    return None


def valid_message_id(value: str) -> bool:
    """Is this usable as a message id?

    The wrapper stamps 20 lowercase hex characters, but it keeps an id a
    single-recipient message already has, and legacy Go tokens carry 21 characters.
    The tracker looks facts up with the id from the token exactly as it was, so we
    take any 1-64 printable ASCII characters without spaces, verbatim (no case change).
    """
    return (
        0 < len(value) <= MAX_MESSAGE_ID
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def _bare_rcpt(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        return value[1:-1].strip()
    return value


#: SparkPost subaccount ids are non-negative integers; 18 digits stay below 2**63.
_MAX_SUBACCOUNT_DIGITS = 18


def parse_subaccount(value: str) -> int | None:
    """``X-Sp-Subaccount-Id`` as an int; None when absent or not a decimal number."""
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= _MAX_SUBACCOUNT_DIGITS:
        return int(value)
    return None


def parse_pmta_time(value: str) -> int | None:
    """A PMTA time stamp in unix seconds, or None.

    PMTA writes ``2020-04-01 12:34:56+0100`` (local time with its UTC offset); older
    versions and some settings write unix seconds. ISO 8601 forms (``T``, ``Z``,
    ``+01:00``) are read too. A time without an offset is ambiguous: None.
    """
    value = value.strip()
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return int(when.timestamp())
