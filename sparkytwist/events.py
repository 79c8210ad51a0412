# -*- test-case-name: tests.test_events -*-
"""Tracking hits as SparkPost Ingest ``track_event`` NDJSON lines.

Pure functions and two small lookup objects (user agent, geo IP) that the feeder
calls for each stream entry; nothing here does network I/O. The field names follow
SparkPost's event schema exactly (docs/events.md has the table): Ingest checks only
the request when it answers, and drops malformed lines later without telling us.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import maxminddb
import ua_parser
from twisted.logger import Logger

from sparkytwist.trackevent import TrackEvent

_log = Logger()

#: Where and how batches go (SparkPost Ingest API).
INGEST_PATH: Final = "/api/v1/ingest/events"
INGEST_CONTENT_TYPE: Final = "application/x-ndjson"
#: A batch (the gzip body) must stay within 5 MB; we read "MB" as 10**6 to be safe.
INGEST_MAX_BYTES: Final = 5_000_000
#: Ingest refuses events older than this.
INGEST_MAX_AGE_SECONDS: Final = 24 * 3600

DELV_METHOD: Final = "esmtp"
CLICK_TYPES: Final = frozenset({"click", "amp_click"})

# event_id layout: (ms << 20) | seq keeps ids ordered like the stream and below 2**62
# until the year 2109; anything outside that goes to the upper half (hashed).
_SEQ_BITS: Final = 20
_MS_LIMIT: Final = 1 << 42
_HASHED_BASE: Final = 1 << 62
_U64: Final = 1 << 64


def event_id_from_stream_id(stream_id: bytes | str) -> str:
    """SparkPost ``event_id`` (decimal string < 2**63) for a Redis Stream entry id.

    The id is a pure function of the entry id, so a batch that is retried (or
    re-claimed by another feeder) carries the same event ids and SparkPost can
    drop the duplicates. ``ms-seq`` with seq < 2**20 and ms < 2**42 (before
    2109) maps to ``(ms << 20) | seq``: unique and ordered, below 2**62. Any
    other id (a million entries in one millisecond, or a far-future timestamp)
    is hashed (BLAKE2b, 62 bits) into [2**62, 2**63): deterministic, and clear
    of the ordinary range, so it can only collide with another such id.
    """
    if isinstance(stream_id, bytes):
        # Fast path for what the feeder reads (bytes.isdigit is ASCII-only).
        ms_b, sep_b, seq_b = stream_id.partition(b"-")
        if sep_b and ms_b.isdigit() and seq_b.isdigit():
            ms, seq = int(ms_b), int(seq_b)
            if seq < (1 << _SEQ_BITS) and ms < _MS_LIMIT:
                return str((ms << _SEQ_BITS) | seq)
    text = stream_id.decode("ascii") if isinstance(stream_id, bytes) else stream_id
    ms_text, sep, seq_text = text.partition("-")
    if not (sep and _is_decimal(ms_text) and _is_decimal(seq_text)):
        raise ValueError(f"not a stream entry id: {text!r}")
    ms, seq = int(ms_text), int(seq_text)
    if ms >= _U64 or seq >= _U64:
        raise ValueError(f"stream entry id out of range: {text!r}")
    if seq < (1 << _SEQ_BITS) and ms < _MS_LIMIT:
        return str((ms << _SEQ_BITS) | seq)
    digest = hashlib.blake2b(f"{ms}-{seq}".encode(), digest_size=8).digest()
    return str(_HASHED_BASE | (int.from_bytes(digest, "big") & (_HASHED_BASE - 1)))


def _is_decimal(s: str) -> bool:
    return s.isascii() and s.isdigit()


# --- user agents -----------------------------------------------------------------

#: OS families (ua-parser names) of phones and tablets.
_MOBILE_OS: Final = frozenset(
    {
        "iOS",
        "iPadOS",
        "Android",
        "Windows Phone",
        "Windows Mobile",
        "BlackBerry OS",
        "BlackBerry Tablet OS",
        "KaiOS",
        "Firefox OS",
        "Symbian OS",
        "Tizen",
        "HarmonyOS",
        "webOS",
    }
)
_MOBILE_DEVICES: Final = frozenset({"iPhone", "iPad", "iPod", "Generic Smartphone"})
_NOT_MOBILE_DEVICES: Final = frozenset({"Spider"})


@dataclass(frozen=True, slots=True)
class UserAgentInfo:
    """What SparkPost's ``user_agent_parsed`` says about a user agent."""

    agent_family: str
    os_family: str
    device_family: str
    is_mobile: bool


class UserAgentParser:
    """ua-parser with a bounded LRU cache of results, keyed by the UA string.

    An uncached parse costs ~0.5-1.5 ms with the pure-Python resolver (hundreds of
    regexes tried in turn); mail traffic repeats a few hundred UA strings, so the
    cache turns nearly every call into a dict hit. ``maxsize=0`` disables it.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self._parser = _new_ua_parser()
        self._cache: OrderedDict[str, UserAgentInfo] = OrderedDict()
        self._maxsize = maxsize
        self.hits = 0
        self.misses = 0

    def __call__(self, user_agent: str) -> UserAgentInfo:
        return self.parse(user_agent)

    def parse(self, user_agent: str) -> UserAgentInfo:
        cache = self._cache
        info = cache.get(user_agent)
        if info is not None:
            cache.move_to_end(user_agent)
            self.hits += 1
            return info
        self.misses += 1
        info = self._parse(user_agent)
        if self._maxsize:
            cache[user_agent] = info
            if len(cache) > self._maxsize:
                cache.popitem(last=False)
        return info

    def __len__(self) -> int:
        return len(self._cache)

    def _parse(self, user_agent: str) -> UserAgentInfo:
        result = self._parser.parse(user_agent).with_defaults()
        agent, os_family = result.user_agent.family, result.os.family
        device = result.device.family
        return UserAgentInfo(
            agent_family=agent,
            os_family=os_family,
            device_family=device,
            is_mobile=_is_mobile(user_agent, os_family, device),
        )


def _new_ua_parser() -> ua_parser.Parser:
    """A private parser (not ua_parser's global one), fastest resolver available."""
    if ua_parser.RegexResolver is not None or ua_parser.Re2Resolver is not None:
        matchers = ua_parser.load_lazy_builtins()
    else:
        matchers = ua_parser.load_builtins()
    return ua_parser.Parser(ua_parser.BestAvailableResolver(matchers))


def _is_mobile(user_agent: str, os_family: str, device_family: str) -> bool:
    if device_family in _NOT_MOBILE_DEVICES:
        return False
    return (
        os_family in _MOBILE_OS
        or device_family in _MOBILE_DEVICES
        or "Mobile" in user_agent
        or "Android" in user_agent
    )


# --- geo IP ----------------------------------------------------------------------

#: Networks no recipient's request comes from (beyond what ipaddress flags).
_NON_PUBLIC_NETS: Final = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    )
)


def _non_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Not ``is_private``: that also covers the documentation ranges the tests use.
    return (
        addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_unspecified
        or addr.is_reserved
        or any(addr.version == n.version and addr in n for n in _NON_PUBLIC_NETS)
    )


class GeoLookup:
    """SparkPost ``geo_ip`` data from a MaxMind GeoIP2/GeoLite2 City database.

    Opened once (memory-mapped, C extension when present) and shared; the owner
    calls :meth:`close`. Lookups are synchronous and take microseconds.
    """

    def __init__(self, path: str, *, language: str = "en") -> None:
        self._reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
        self._ipv4_only = self._reader.metadata().ip_version == 4
        self._language = language

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> GeoLookup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def lookup(self, ip: str) -> dict[str, Any] | None:
        """``geo_ip`` for an address, or None (private, unknown to the DB, invalid)."""
        try:
            addr = ipaddress.ip_address(ip.strip())
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # dual-stack sockets report IPv4 peers like this
        if _non_public(addr) or (addr.version == 6 and self._ipv4_only):
            return None
        record = self._reader.get(addr)  # ValueError once closed: a bug, let it show
        if not isinstance(record, dict):
            return None
        return self._geo_ip(record)

    def _geo_ip(self, record: Mapping[str, object]) -> dict[str, Any] | None:
        geo: dict[str, Any] = {}
        country = _path(record, "country", "iso_code")
        if not isinstance(country, str):
            country = _path(record, "registered_country", "iso_code")
        if isinstance(country, str):
            geo["country"] = country
        subdivisions = record.get("subdivisions")
        if isinstance(subdivisions, list) and subdivisions:
            region = _path(subdivisions[0], "iso_code")
            if isinstance(region, str):
                geo["region"] = region
        city = _path(record, "city", "names", self._language)
        if isinstance(city, str):
            geo["city"] = city
        for key in ("latitude", "longitude"):
            value = _path(record, "location", key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                geo[key] = float(value)
        postal = _path(record, "postal", "code")
        if isinstance(postal, str) and postal:
            geo["postal_code"] = postal
            # SparkPost's ``zip`` is a number: only a US ZIP code fits it.
            if geo.get("country") == "US" and len(postal) == 5 and _is_decimal(postal):
                geo["zip"] = int(postal)
        return geo or None


def _path(record: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


# --- accounting enrichment -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrichment:
    """Delivery facts from PMTA accounting, as the store keeps them per recipient."""

    campaign_id: str | None = None
    subaccount_id: int | None = None
    friendly_from: str | None = None
    sending_ip: str | None = None
    ip_pool: str | None = None
    routing_domain: str | None = None


_ENRICHMENT_TEXT_FIELDS: Final = (
    "campaign_id",
    "friendly_from",
    "sending_ip",
    "ip_pool",
    "routing_domain",
)


def enrichment_from_hash(
    mapping: Mapping[bytes, bytes] | Mapping[str, str],
) -> Enrichment | None:
    """Read the store's per-recipient hash; None when it holds nothing we send.

    Missing and empty fields stay None (so they are left out of the event). A
    subaccount_id that is not a non-negative integer is dropped with a warning:
    SparkPost wants a number there.
    """
    if not mapping:
        return None
    fields: dict[str, str] = {}
    for key, value in mapping.items():
        k = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        v = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        fields[k] = v
    text = {name: fields.get(name) or None for name in _ENRICHMENT_TEXT_FIELDS}
    subaccount: int | None = None
    raw_sub = fields.get("subaccount_id", "").strip()
    if raw_sub:
        if _is_decimal(raw_sub) and int(raw_sub) < (1 << 63):
            subaccount = int(raw_sub)
        else:
            _log.warn("ignoring subaccount_id {value!r}: not a number", value=raw_sub)
    if subaccount is None and not any(text.values()):
        return None
    return Enrichment(subaccount_id=subaccount, **text)


# --- the event -------------------------------------------------------------------


def sparkpost_event(
    entry_id: bytes | str,
    event: TrackEvent,
    *,
    ua: UserAgentInfo,
    geo: dict[str, Any] | None,
    enrichment: Enrichment | None,
    link_name: str = "",
) -> dict[str, Any]:
    """One NDJSON object ``{"msys": {"track_event": {...}}}`` for a tracking hit.

    Optional fields are left out rather than sent empty: ``ip_address`` and
    ``user_agent`` when the hit had none, ``target_link_url`` on opens,
    ``target_link_name`` unless known, ``geo_ip`` without a lookup result, and each
    enrichment field the store did not have.
    """
    te: dict[str, Any] = {
        "type": event.type,
        "delv_method": DELV_METHOD,
        "event_id": event_id_from_stream_id(entry_id),
        "message_id": event.message_id,
        # SparkPost: rcpt_to is the lowercased address, raw_rcpt_to as given in RCPT TO.
        "rcpt_to": event.rcpt.lower(),
        "raw_rcpt_to": event.rcpt,
        "timestamp": str(event.timestamp_ms // 1000),
        "user_agent_parsed": {
            "agent_family": ua.agent_family,
            "os_family": ua.os_family,
            "device_family": ua.device_family,
            "is_mobile": ua.is_mobile,
            "is_proxy": event.is_proxy,
            "is_prefetched": event.is_prefetched,
        },
    }
    if event.ip:
        te["ip_address"] = event.ip
    if event.user_agent:
        te["user_agent"] = event.user_agent
    if event.type in CLICK_TYPES:
        te["target_link_url"] = event.url
    if link_name:
        te["target_link_name"] = link_name
    if geo:
        te["geo_ip"] = dict(geo)
    if enrichment is not None:
        for name in (*_ENRICHMENT_TEXT_FIELDS, "subaccount_id"):
            value = getattr(enrichment, name)
            if value is not None:
                te[name] = value
    return {"msys": {"track_event": te}}


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def ndjson_line(ev: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON on one line, ``\\n``-terminated.

    json.dumps escapes every control character, so a value can never break the line.
    A lone surrogate (an undecodable header byte) becomes U+FFFD rather than
    invalid UTF-8.
    """
    text = json.dumps(ev, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode("utf-8") + b"\n"


def encode_batch(lines: Iterable[bytes], compresslevel: int = 6) -> bytes:
    """The gzip request body for a batch of NDJSON lines.

    Level 6 (zlib's default): on 1 MB of our events it is 25 % smaller than level 1
    and within 8 % of level 9 at less than half level 9's CPU (6 ms vs 14 ms a MB,
    spent on the reactor thread); docs/events.md has the numbers. ``mtime=0`` makes
    the body a pure function of the lines, so a retried batch is byte-identical.
    """
    return gzip.compress(b"".join(lines), compresslevel=compresslevel, mtime=0)


# --- the same lines, fast ----------------------------------------------------------

def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


#: The C string encoder json.dumps uses with ensure_ascii=False.
_json_str: Final = json.encoder.encode_basestring


def _json_flags(proxy: bool, prefetched: bool) -> str:
    return ',"is_proxy":' + _compact(proxy) + ',"is_prefetched":' + _compact(prefetched) + "}"


#: The end of ``user_agent_parsed``, by (is_proxy, is_prefetched).
_FLAG_PARTS: Final = {
    (proxy, prefetched): _json_flags(proxy, prefetched)
    for proxy in (False, True) for prefetched in (False, True)
}


def _utf8_line(text: str) -> bytes:
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode("utf-8") + b"\n"


def encode_enrichment(enrichment: Enrichment | None) -> str:
    """The enrichment members of a line (``,"campaign_id":…``), for :meth:`LineEncoder.line`.

    Recipients of one campaign share their facts: encode each distinct set once.
    """
    if enrichment is None:
        return ""
    members = {name: value for name in (*_ENRICHMENT_TEXT_FIELDS, "subaccount_id")
               if (value := getattr(enrichment, name)) is not None}
    return "," + _compact(members)[1:-1] if members else ""


class LineEncoder:
    """``ndjson_line(sparkpost_event(...))``, byte for byte, at a fraction of the cost.

    The feeder builds one line per event; json.dumps of the nested dict was its
    biggest cost. Here the fixed keys are literal text, the parts that repeat (a
    user agent's parsed fields and the UA itself; the delivery facts, through
    :func:`encode_enrichment`) are encoded once, and only each event's own strings
    go through the C string encoder json.dumps uses. Tests check the two agree.
    """

    def __init__(self, ua: Callable[[str], UserAgentInfo], maxsize: int = 10_000) -> None:
        self._ua = ua
        self._maxsize = max(1, maxsize)
        self._ua_parts: dict[str, tuple[str, str]] = {}
        self._heads: dict[str, str] = {}

    def line(
        self,
        entry_id: bytes | str,
        event: TrackEvent,
        *,
        geo: Mapping[str, Any] | None = None,
        enrichment: str = "",
        link_name: str = "",
    ) -> bytes:
        """The NDJSON line; ``enrichment`` is what :func:`encode_enrichment` made."""
        head = self._heads.get(event.type)
        if head is None:
            head = self._head(event.type)
        parsed, ua_member = self._ua_member(event.user_agent)
        flags = _FLAG_PARTS[(event.is_proxy, event.is_prefetched) if event.flags
                            else (False, False)]
        rcpt = event.rcpt
        text = (
            f'{head}{event_id_from_stream_id(entry_id)}","message_id":'
            f'{_json_str(event.message_id)},"rcpt_to":{_json_str(rcpt.lower())}'
            f',"raw_rcpt_to":{_json_str(rcpt)},"timestamp":"{event.timestamp_ms // 1000}"'
            f'{parsed}{flags}'
        )
        if event.ip:
            text += ',"ip_address":' + _json_str(event.ip)
        text += ua_member
        if event.type in CLICK_TYPES:
            text += ',"target_link_url":' + _json_str(event.url)
        if link_name:
            text += ',"target_link_name":' + _json_str(link_name)
        if geo:
            text += ',"geo_ip":' + _compact(dict(geo))
        return _utf8_line(text + enrichment + "}}}")

    def _head(self, type_: str) -> str:
        head = ('{"msys":{"track_event":{"type":' + _json_str(type_)
                + f',"delv_method":{_json_str(DELV_METHOD)},"event_id":"')
        if len(self._heads) < 64:  # the six types; anything else is not kept
            self._heads[type_] = head
        return head

    def _ua_member(self, user_agent: str) -> tuple[str, str]:
        """(``,"user_agent_parsed":{…"is_mobile":x``, ``,"user_agent":"…"``) of a UA."""
        parts = self._ua_parts.get(user_agent)
        if parts is None:
            info = self._ua(user_agent)
            parsed = _compact({"agent_family": info.agent_family,
                               "os_family": info.os_family,
                               "device_family": info.device_family,
                               "is_mobile": info.is_mobile})
            parts = (',"user_agent_parsed":' + parsed[:-1],
                     ',"user_agent":' + _json_str(user_agent) if user_agent else "")
            if len(self._ua_parts) >= self._maxsize:
                del self._ua_parts[next(iter(self._ua_parts))]  # the oldest
            self._ua_parts[user_agent] = parts
        return parts
