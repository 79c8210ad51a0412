# -*- test-case-name: tests.test_events -*-
"""Tests for sparkytwist.events: tracking hits as SparkPost track_event lines."""

from __future__ import annotations

import gzip
import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.events import (
    INGEST_MAX_AGE_SECONDS,
    Enrichment,
    GeoLookup,
    LineEncoder,
    UserAgentInfo,
    UserAgentParser,
    encode_batch,
    encode_enrichment,
    enrichment_from_hash,
    event_id_from_stream_id,
    ndjson_line,
    sparkpost_event,
)
from sparkytwist.trackevent import EVENT_TYPES, TrackEvent
from tests.support import mmdb
from tests.support.fake_ingest import validate_line

# Real user agents of the clients that open mail most.
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
OUTLOOK_DESKTOP = (
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 10.0; WOW64; Trident/7.0; .NET4.0C; "
    ".NET4.0E; .NET CLR 2.0.50727; Microsoft Outlook 16.0.5266; ms-office; MSOffice 16)"
)
CHROME_ANDROID = (
    "Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Mobile Safari/537.36"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
MAC_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)

DESKTOP = UserAgentInfo("Outlook", "Windows", "Other", is_mobile=False)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _hit(type_: str = "open", **kw: object) -> TrackEvent:
    fields: dict[str, object] = {
        "type": type_,
        "message_id": "65f0a1b2c3d4e5f6a7b8",
        "rcpt": "Fred.Bloggs@Example.COM",
        "timestamp_ms": 1_700_000_123_456,
        "ip": "203.0.113.7",
        "user_agent": OUTLOOK_DESKTOP,
        "url": "https://shop.example.com/p/1?utm_source=mail" if "click" in type_ else "",
    }
    fields.update(kw)
    return TrackEvent(**fields)  # type: ignore[arg-type]


def _track_event(line: dict[str, object]) -> dict[str, object]:
    assert set(line) == {"msys"}
    msys = line["msys"]
    assert isinstance(msys, dict) and set(msys) == {"track_event"}
    te = msys["track_event"]
    assert isinstance(te, dict)
    return te


class EventIdTests(SynchronousTestCase):
    def test_layout(self) -> None:
        """An ordinary entry id becomes (ms << 20) | seq."""
        self.assertEqual(event_id_from_stream_id(b"1700000000000-0"), str(1_700_000_000_000 << 20))
        self.assertEqual(
            event_id_from_stream_id("1700000000000-5"), str((1_700_000_000_000 << 20) | 5)
        )

    def test_bytes_and_str_agree_and_repeat(self) -> None:
        """A retried batch (same entry ids) carries the same event ids."""
        ids = [event_id_from_stream_id(b"1712345678901-3") for _ in range(3)]
        ids.append(event_id_from_stream_id("1712345678901-3"))
        self.assertEqual(len(set(ids)), 1)

    def test_ordered_like_the_stream(self) -> None:
        entries = ["1-0", "1-1", "1-1048575", "2-0", "1700000000000-0", "1700000000001-7"]
        ids = [int(event_id_from_stream_id(e)) for e in entries]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), len(ids))

    def test_sequence_overflow_is_hashed_apart(self) -> None:
        """A million entries in one ms leave the ordinary range, deterministically."""
        ms = 1_700_000_000_000
        over = [event_id_from_stream_id(f"{ms}-{seq}") for seq in (1 << 20, (1 << 20) + 1)]
        self.assertEqual(over[0], event_id_from_stream_id(f"{ms}-{1 << 20}"))
        self.assertNotEqual(over[0], over[1])
        for eid in over:
            self.assertGreaterEqual(int(eid), 1 << 62)
            self.assertLess(int(eid), 1 << 63)
        self.assertNotIn(event_id_from_stream_id(f"{ms}-0"), over)

    def test_extremes_stay_in_range(self) -> None:
        for entry in (
            "0-0",
            f"{(1 << 42) - 1}-{(1 << 20) - 1}",
            f"{(1 << 64) - 1}-{(1 << 64) - 1}",
        ):
            eid = event_id_from_stream_id(entry)
            self.assertTrue(eid.isdigit())
            self.assertLess(int(eid), 1 << 63)
        self.assertEqual(event_id_from_stream_id("0-0"), "0")

    def test_rejects_what_is_not_an_entry_id(self) -> None:
        for bad in ("", "123", "1-", "-1", "1-2-3", "a-1", "1.5-0", "１-2", " 1-2", f"{1 << 64}-0"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                event_id_from_stream_id(bad)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, (1 << 42) - 1), st.integers(0, (1 << 20) - 1)),
            min_size=2,
            max_size=50,
            unique=True,
        )
    )
    def test_distinct_entries_distinct_ids(self, entries: list[tuple[int, int]]) -> None:
        ids = [event_id_from_stream_id(f"{ms}-{seq}") for ms, seq in entries]
        self.assertEqual(len(set(ids)), len(entries))
        for eid in ids:
            self.assertLess(int(eid), 1 << 62)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
    def test_any_redis_id_fits(self, ms: int, seq: int) -> None:
        eid = event_id_from_stream_id(f"{ms}-{seq}".encode())
        self.assertRegex(eid, r"^(0|[1-9][0-9]*)$")
        self.assertLess(int(eid), 1 << 63)


class UserAgentParserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.parser = UserAgentParser(maxsize=100)

    def test_real_user_agents(self) -> None:
        cases = {
            GMAIL_PROXY: ("GmailImageProxy", "Windows", "Other", False),
            IPHONE_MAIL: (None, "iOS", "iPhone", True),
            OUTLOOK_DESKTOP: ("Outlook", "Windows", "Other", False),
            CHROME_ANDROID: ("Chrome Mobile", "Android", "Pixel 7", True),
            YAHOO_PROXY: ("YahooMailProxy", "Other", "Spider", False),
            MAC_MAIL: ("Apple Mail", "Mac OS X", "Mac", False),
            "": ("Other", "Other", "Other", False),
        }
        for ua, (agent, os_family, device, mobile) in cases.items():
            with self.subTest(ua=ua):
                info = self.parser.parse(ua)
                if agent is not None:
                    self.assertEqual(info.agent_family, agent)
                self.assertEqual(
                    (info.os_family, info.device_family, info.is_mobile),
                    (os_family, device, mobile),
                )

    def test_repeat_is_a_cache_hit(self) -> None:
        first = self.parser(IPHONE_MAIL)
        second = self.parser(IPHONE_MAIL)
        self.assertIs(first, second)
        self.assertEqual((self.parser.hits, self.parser.misses), (1, 1))

    def test_cache_is_bounded_lru(self) -> None:
        parser = UserAgentParser(maxsize=2)
        parser(GMAIL_PROXY)
        parser(YAHOO_PROXY)
        parser(GMAIL_PROXY)  # now most recent
        parser(MAC_MAIL)  # evicts YAHOO_PROXY
        self.assertEqual(len(parser), 2)
        misses = parser.misses
        parser(GMAIL_PROXY)
        self.assertEqual(parser.misses, misses)
        parser(YAHOO_PROXY)
        self.assertEqual(parser.misses, misses + 1)

    def test_cache_can_be_off(self) -> None:
        parser = UserAgentParser(maxsize=0)
        self.assertEqual(parser(OUTLOOK_DESKTOP), parser(OUTLOOK_DESKTOP))
        self.assertEqual((len(parser), parser.hits, parser.misses), (0, 0, 2))
        with self.assertRaises(ValueError):
            UserAgentParser(maxsize=-1)

    def test_parsers_do_not_share_a_cache(self) -> None:
        other = UserAgentParser()
        self.parser(CHROME_ANDROID)
        other(CHROME_ANDROID)
        self.assertEqual((self.parser.misses, other.misses), (1, 1))


class EnrichmentTests(SynchronousTestCase):
    FULL = {
        b"campaign_id": b"spring-sale",
        b"subaccount_id": b"42",
        b"friendly_from": b"news@shop.example.com",
        b"sending_ip": b"198.51.100.3",
        b"ip_pool": b"shared",
        b"routing_domain": b"example.com",
        b"delivered_at": b"1700000000",
    }

    def test_full_hash(self) -> None:
        self.assertEqual(
            enrichment_from_hash(self.FULL),
            Enrichment(
                "spring-sale", 42, "news@shop.example.com", "198.51.100.3", "shared", "example.com"
            ),
        )

    def test_missing_and_empty_fields_stay_none(self) -> None:
        got = enrichment_from_hash({b"campaign_id": b"c1", b"ip_pool": b"", b"delivered_at": b"1"})
        self.assertEqual(got, Enrichment(campaign_id="c1"))

    def test_no_delivery_record(self) -> None:
        self.assertIsNone(enrichment_from_hash({}))
        self.assertIsNone(enrichment_from_hash({b"delivered_at": b"1700000000"}))

    def test_bad_subaccount_is_dropped(self) -> None:
        for bad in (b"abc", b"-1", b"1.5", b"99999999999999999999"):
            with self.subTest(bad=bad):
                got = enrichment_from_hash({b"subaccount_id": bad, b"campaign_id": b"c"})
                self.assertEqual(got, Enrichment(campaign_id="c"))

    def test_decoded_hash_and_utf8(self) -> None:
        got = enrichment_from_hash({"friendly_from": "jörg@exämple.de", "subaccount_id": "0"})
        self.assertEqual(got, Enrichment(friendly_from="jörg@exämple.de", subaccount_id=0))
        got = enrichment_from_hash({b"friendly_from": "jörg@exämple.de".encode()})
        self.assertEqual(got, Enrichment(friendly_from="jörg@exämple.de"))


class SparkPostEventTests(SynchronousTestCase):
    def _event(self, hit: TrackEvent, **kw: object) -> dict[str, object]:
        args: dict[str, object] = {"ua": DESKTOP, "geo": None, "enrichment": None}
        args.update(kw)
        return _track_event(sparkpost_event(b"1700000123456-2", hit, **args))  # type: ignore[arg-type]

    def test_open_shape(self) -> None:
        te = self._event(_hit("open"))
        self.assertEqual(
            te,
            {
                "type": "open",
                "delv_method": "esmtp",
                "event_id": event_id_from_stream_id(b"1700000123456-2"),
                "message_id": "65f0a1b2c3d4e5f6a7b8",
                "rcpt_to": "fred.bloggs@example.com",
                "raw_rcpt_to": "Fred.Bloggs@Example.COM",
                "timestamp": "1700000123",
                "ip_address": "203.0.113.7",
                "user_agent": OUTLOOK_DESKTOP,
                "user_agent_parsed": {
                    "agent_family": "Outlook",
                    "os_family": "Windows",
                    "device_family": "Other",
                    "is_mobile": False,
                    "is_proxy": False,
                    "is_prefetched": False,
                },
            },
        )

    def test_every_type(self) -> None:
        """Opens never carry a link; clicks always carry the one followed."""
        for type_ in sorted(EVENT_TYPES):
            with self.subTest(type=type_):
                te = self._event(_hit(type_))
                self.assertEqual(te["type"], type_)
                if type_ in ("click", "amp_click"):
                    self.assertEqual(
                        te["target_link_url"], "https://shop.example.com/p/1?utm_source=mail"
                    )
                else:
                    self.assertNotIn("target_link_url", te)
                self.assertNotIn("target_link_name", te)
                self.assertEqual(validate_line({"msys": {"track_event": te}}, 1_700_000_200), [])

    def test_link_name_only_when_known(self) -> None:
        te = self._event(_hit("click"), link_name="Buy now")
        self.assertEqual(te["target_link_name"], "Buy now")

    def test_flags(self) -> None:
        cases = {
            "": (False, False),
            "p": (True, False),
            "f": (False, True),
            "b": (False, True),
            "h": (False, True),
            "pf": (True, True),
        }
        for flags, (proxy, prefetched) in cases.items():
            with self.subTest(flags=flags):
                parsed = self._event(_hit("open", flags=flags))["user_agent_parsed"]
                assert isinstance(parsed, dict)
                self.assertEqual((parsed["is_proxy"], parsed["is_prefetched"]), (proxy, prefetched))

    def test_parsed_user_agent_fields(self) -> None:
        ua = UserAgentParser().parse(CHROME_ANDROID)
        parsed = self._event(_hit("click", user_agent=CHROME_ANDROID), ua=ua)["user_agent_parsed"]
        self.assertEqual(
            parsed,
            {
                "agent_family": "Chrome Mobile",
                "os_family": "Android",
                "device_family": "Pixel 7",
                "is_mobile": True,
                "is_proxy": False,
                "is_prefetched": False,
            },
        )

    def test_enrichment(self) -> None:
        enrichment = enrichment_from_hash(EnrichmentTests.FULL)
        te = self._event(_hit("open"), enrichment=enrichment)
        self.assertEqual(te["campaign_id"], "spring-sale")
        self.assertEqual(te["subaccount_id"], 42)
        self.assertEqual(te["friendly_from"], "news@shop.example.com")
        self.assertEqual(te["sending_ip"], "198.51.100.3")
        self.assertEqual(te["ip_pool"], "shared")
        self.assertEqual(te["routing_domain"], "example.com")
        self.assertNotIn("delivered_at", te)

    def test_partial_and_absent_enrichment(self) -> None:
        names = {
            "campaign_id",
            "subaccount_id",
            "friendly_from",
            "sending_ip",
            "ip_pool",
            "routing_domain",
        }
        te = self._event(_hit("open"), enrichment=Enrichment(ip_pool="p1"))
        self.assertEqual(names & set(te), {"ip_pool"})
        te = self._event(_hit("open"), enrichment=None)
        self.assertEqual(names & set(te), set())

    def test_missing_ip_and_user_agent_are_left_out(self) -> None:
        te = self._event(_hit("open", ip="", user_agent=""))
        self.assertNotIn("ip_address", te)
        self.assertNotIn("user_agent", te)
        self.assertIn("user_agent_parsed", te)

    def test_geo_from_generated_database(self) -> None:
        path = mmdb.write_city_mmdb(self.mktemp())
        geo = GeoLookup(path)
        self.addCleanup(geo.close)
        te = self._event(_hit("open", ip=mmdb.US_IP), geo=geo.lookup(mmdb.US_IP))
        self.assertEqual(te["geo_ip"], mmdb.US_GEO)
        te = self._event(_hit("open", ip="10.1.2.3"), geo=geo.lookup("10.1.2.3"))
        self.assertNotIn("geo_ip", te)


class GeoLookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.geo = GeoLookup(mmdb.write_city_mmdb(self.mktemp()))
        self.addCleanup(self.geo.close)

    def test_city_record(self) -> None:
        self.assertEqual(self.geo.lookup(mmdb.US_IP), mmdb.US_GEO)

    def test_ipv6_non_ascii_and_no_zip_outside_us(self) -> None:
        self.assertEqual(self.geo.lookup(mmdb.DE_IP), mmdb.DE_GEO)

    def test_country_only(self) -> None:
        self.assertEqual(self.geo.lookup(mmdb.COUNTRY_ONLY_IP), mmdb.COUNTRY_ONLY_GEO)

    def test_ipv4_mapped_ipv6(self) -> None:
        self.assertEqual(self.geo.lookup("::ffff:" + mmdb.US_IP), mmdb.US_GEO)

    def test_nothing_for_private_unknown_invalid(self) -> None:
        for ip in (
            mmdb.UNKNOWN_IP,
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "169.254.1.1",
            "224.0.0.1",
            "0.0.0.0",
            "",
            "not-an-ip",
            "203.0.113.300",
        ):
            with self.subTest(ip=ip):
                self.assertIsNone(self.geo.lookup(ip))

    def test_context_manager_closes(self) -> None:
        with GeoLookup(mmdb.write_city_mmdb(self.mktemp())) as geo:
            self.assertIsNotNone(geo.lookup(mmdb.US_IP))
        with self.assertRaises(ValueError):
            geo.lookup(mmdb.US_IP)


class EncodingTests(SynchronousTestCase):
    def test_ndjson_line_is_one_compact_utf8_line(self) -> None:
        hit = _hit(
            "click",
            url="https://bücher.example/straße?q=café&x=日本",
            user_agent="Mozilla/5.0 (Ünïcode; line\nbreak\u2028sep) \x00",
        )
        ev = sparkpost_event(b"1-1", hit, ua=DESKTOP, geo={"city": "München"}, enrichment=None)
        line = ndjson_line(ev)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertIn("straße".encode(), line)  # raw UTF-8, not \\u escapes
        self.assertIn("München".encode(), line)
        self.assertNotIn(b", ", line)
        self.assertNotIn(b'": ', line)
        self.assertEqual(json.loads(line.decode("utf-8")), ev)

    def test_lone_surrogate_becomes_valid_utf8(self) -> None:
        ev = {"msys": {"track_event": {"user_agent": "bad \udcff byte"}}}
        line = ndjson_line(ev)
        parsed = json.loads(line.decode("utf-8"))  # must be valid UTF-8
        self.assertEqual(parsed["msys"]["track_event"]["user_agent"], "bad \ufffd byte")

    def test_gzip_round_trip(self) -> None:
        lines = [
            ndjson_line(
                sparkpost_event(
                    f"1-{i}".encode(), _hit("open"), ua=DESKTOP, geo=None, enrichment=None
                )
            )
            for i in range(500)
        ]
        body = encode_batch(lines)
        self.assertEqual(body[:2], b"\x1f\x8b")
        self.assertEqual(gzip.decompress(body), b"".join(lines))
        self.assertLess(len(body), len(b"".join(lines)) // 5)

    def test_batch_is_deterministic(self) -> None:
        """A retried batch is byte-identical (no timestamp in the gzip header)."""
        lines = [b'{"a":1}\n', b'{"b":2}\n']
        self.assertEqual(encode_batch(lines), encode_batch(iter(lines)))
        for level in (1, 9):
            self.assertEqual(gzip.decompress(encode_batch(lines, level)), b"".join(lines))

    @settings(max_examples=60, deadline=None)
    @given(
        type_=st.sampled_from(sorted(EVENT_TYPES)),
        rcpt_local=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20),
        url=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60),
        ua=st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
        flags=st.sampled_from(["", "p", "f", "b", "h", "pb"]),
        seq=st.integers(0, (1 << 21)),
    )
    def test_any_hit_makes_a_line_ingest_accepts(
        self, type_: str, rcpt_local: str, url: str, ua: str, flags: str, seq: int
    ) -> None:
        now_ms = _now_ms()
        hit = TrackEvent(
            type_,
            "65f0a1b2c3d4e5f6a7b8",
            f"{rcpt_local}@example.com",
            now_ms,
            "198.51.100.9",
            ua,
            url="https://example.com/" + url if "click" in type_ else "",
            flags=flags,
        )
        line = ndjson_line(
            sparkpost_event(f"{now_ms}-{seq}".encode(), hit, ua=DESKTOP, geo=None, enrichment=None)
        )
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(validate_line(json.loads(line), now_ms / 1000), [])

    def test_old_events_are_what_ingest_refuses(self) -> None:
        """The fake's age rule matches the constant the feeder uses."""
        now = 1_700_000_000
        hit = _hit("open", timestamp_ms=(now - INGEST_MAX_AGE_SECONDS - 1) * 1000)
        ev = sparkpost_event(b"1-0", hit, ua=DESKTOP, geo=None, enrichment=None)
        self.assertEqual(len(validate_line(ev, now)), 1)


# Any text a stream entry or a lookup could hold: control characters, non-ASCII,
# lone surrogates (undecodable bytes read with surrogateescape).
_ANY_TEXT = st.text(st.one_of(st.characters(), st.sampled_from(
    ["\udcff", "\ud83d", "\x00", "\n", '"', "\\", "/", "\u2028", "ß"])), max_size=30)
_OPTIONAL_TEXT = st.one_of(st.none(), _ANY_TEXT)
_UA_INFOS = st.builds(UserAgentInfo, _ANY_TEXT, _ANY_TEXT, _ANY_TEXT, st.booleans())
_GEOS = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["country", "region", "city", "latitude", "longitude", "postal_code",
                     "zip"]),
    st.one_of(_ANY_TEXT, st.floats(allow_nan=False, allow_infinity=False),
              st.integers(-(2**70), 2**70)),
    max_size=7))
_ENRICHMENTS = st.one_of(st.none(), st.builds(
    Enrichment, _OPTIONAL_TEXT, st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    _OPTIONAL_TEXT, _OPTIONAL_TEXT, _OPTIONAL_TEXT, _OPTIONAL_TEXT))


class LineEncoderTests(SynchronousTestCase):
    """The feeder's fast path must give exactly the bytes of the reference path."""

    def reference(self, entry_id: bytes | str, hit: TrackEvent, info: UserAgentInfo,
                  geo: dict[str, object] | None, enrichment: Enrichment | None,
                  link_name: str = "") -> bytes:
        return ndjson_line(sparkpost_event(entry_id, hit, ua=info, geo=geo,
                                           enrichment=enrichment, link_name=link_name))

    @settings(max_examples=150, deadline=None)
    @given(
        type_=st.one_of(st.sampled_from(sorted(EVENT_TYPES)), _ANY_TEXT),
        msg=_ANY_TEXT, rcpt=_ANY_TEXT, ip=_ANY_TEXT, ua=_ANY_TEXT, url=_ANY_TEXT,
        flags=st.text(st.sampled_from("pfbhx"), max_size=3),
        ts=st.integers(-(2**50), 2**60),
        entry=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
        as_bytes=st.booleans(),
        info=_UA_INFOS, geo=_GEOS, enrichment=_ENRICHMENTS, link_name=_ANY_TEXT,
    )
    def test_same_bytes_as_ndjson_line_of_sparkpost_event(
        self, type_: str, msg: str, rcpt: str, ip: str, ua: str, url: str, flags: str,
        ts: int, entry: tuple[int, int], as_bytes: bool, info: UserAgentInfo,
        geo: dict[str, object] | None, enrichment: Enrichment | None, link_name: str,
    ) -> None:
        hit = TrackEvent(type_, msg, rcpt, ts, ip, ua, url, flags)
        entry_id: bytes | str = f"{entry[0]}-{entry[1]}"
        if as_bytes:
            entry_id = entry_id.encode()
        encoder = LineEncoder(lambda _: info)
        expected = self.reference(entry_id, hit, info, geo, enrichment, link_name)
        for _ in range(2):  # the second time from the caches
            self.assertEqual(
                encoder.line(entry_id, hit, geo=geo, enrichment=encode_enrichment(enrichment),
                             link_name=link_name),
                expected)

    def test_real_parser_and_the_documented_example(self) -> None:
        hit = TrackEvent("click", "6745c3a0aabbccddeeff", "Fred@Example.com",
                         1732625000123, "203.0.113.7", IPHONE_MAIL,
                         "https://shop.example.com/straße?utm_source=mail")
        geo = {"country": "US", "region": "MD", "city": "Columbia", "latitude": 39.1749,
               "longitude": -76.8375, "postal_code": "21046", "zip": 21046}
        facts = Enrichment("spring-sale", 42, "news@shop.example.com", "198.51.100.3",
                           "shared", "example.com")
        parser = UserAgentParser()
        line = LineEncoder(parser).line(b"1732625000123-0", hit, geo=geo,
                                        enrichment=encode_enrichment(facts))
        self.assertEqual(line, self.reference(b"1732625000123-0", hit, parser(IPHONE_MAIL),
                                              geo, facts))
        self.assertIn(b'"event_id":"1816788992128974848"', line)

    def test_user_agent_cache_is_bounded(self) -> None:
        calls: list[str] = []

        def parse(ua: str) -> UserAgentInfo:
            calls.append(ua)
            return DESKTOP

        encoder = LineEncoder(parse, maxsize=2)
        for ua in ("a", "b", "a", "c", "a"):
            encoder.line(b"1-0", _hit(user_agent=ua))
        self.assertEqual(calls, ["a", "b", "c", "a"])  # "a" was the oldest when "c" came

    def test_nan_is_refused_like_ndjson_line(self) -> None:
        encoder = LineEncoder(lambda _: DESKTOP)
        with self.assertRaises(ValueError):
            encoder.line(b"1-0", _hit(), geo={"latitude": float("nan")})

    def test_bad_entry_id_is_refused(self) -> None:
        encoder = LineEncoder(lambda _: DESKTOP)
        for bad in (b"1-x", b"12", "\u0661-0", b"-1-0"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                encoder.line(bad, _hit())

    def test_no_enrichment_adds_nothing(self) -> None:
        self.assertEqual(encode_enrichment(None), "")
        self.assertEqual(encode_enrichment(Enrichment()), "")
        self.assertEqual(encode_enrichment(Enrichment(subaccount_id=0)), ',"subaccount_id":0')
