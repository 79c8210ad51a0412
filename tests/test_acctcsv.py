"""Tests for sparkytwist.acctcsv: the PMTA accounting CSV stream parser."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.acctcsv import (
    AccountingParser,
    DeliveryFacts,
    ParseCounts,
    Record,
    SkipReason,
    delivery_facts,
    parse_pmta_time,
    skip_reason,
    valid_message_id,
)

SAMPLE = Path(__file__).parent / "data" / "acct" / "sample.csv"

HEADER = b"type,timeLogged,orig,rcpt,jobId,vmtaPool,dlvSourceIp,header_x-sp-message-id\r\n"
GOOD = b"d,2020-04-01 12:34:56+0100,from@example.com,to@example.org,job1,pool1,192.0.2.1,0123456789abcdef0123\r\n"  # noqa: E501


def parse(
    data: bytes, sizes: list[int] | None = None, **kw: int
) -> tuple[AccountingParser, list[Record]]:
    """Feed ``data`` in pieces of the given sizes (cycled), or at once; then finish."""
    p = AccountingParser(**kw)
    out: list[Record] = []
    if not sizes:
        out += p.feed(data)
    else:
        pos = k = 0
        while pos < len(data):
            n = sizes[k % len(sizes)]
            out += p.feed(data[pos : pos + n])
            pos += n
            k += 1
    out += p.finish()
    return p, out


def outcome(p: AccountingParser, records: list[Record]) -> tuple[object, ...]:
    """Everything a caller can observe after a stream."""
    return ([dict(r) for r in records], p.counts, p.last_problem)


class SampleTests(SynchronousTestCase):
    """The realistic sample: mixed types, a re-sent header, quoted fields."""

    def setUp(self) -> None:
        self.data = SAMPLE.read_bytes()
        self.parser = AccountingParser()
        self.records = self.parser.feed(self.data) + self.parser.finish()

    def test_counts_every_type(self) -> None:
        c = self.parser.counts
        self.assertEqual(c.records, 25)
        self.assertEqual(c.headers, 2)
        self.assertEqual(c.malformed, 0)
        self.assertEqual(c.before_header, 0)
        self.assertEqual(
            c.by_type,
            {"d": 10, "b": 3, "t": 3, "tq": 2, "r": 4, "f": 1, "rb": 1, "rs": 1},
        )
        self.assertEqual(sum(c.by_type.values()), len(self.records))

    def test_multiline_quoted_diag_keeps_its_crlf(self) -> None:
        dave = next(r for r in self.records if r["rcpt"] == "dave@example.com")
        self.assertEqual(dave.type, "b")
        self.assertEqual(
            dave["dsnDiag"],
            "smtp;550-5.7.1 [203.0.113.10] Our system has detected that this message is\r\n"
            "550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n"
            "550 5.7.1 this message has been blocked. - gsmtp",
        )
        self.assertEqual(dave["dsnStatus"], "5.7.1 (delivery not authorized, message refused)")
        self.assertEqual(dave["bounceCat"], "spam-related")

    def test_bare_lf_inside_quotes_and_doubled_quotes(self) -> None:
        rupert = next(r for r in self.records if r["rcpt"] == "rupert@example.net")
        self.assertEqual(
            rupert["dsnDiag"],
            "smtp;554 5.7.1 Service unavailable;\n"
            "Client host [203.0.113.16] blocked using zen.spamhaus.org",
        )
        peggy = next(r for r in self.records if r["rcpt"] == "peggy@example.org")
        self.assertEqual(peggy["dsnDiag"], 'smtp;250 2.0.0 OK "queued", as 7F3A2')

    def test_resent_header_with_another_order(self) -> None:
        first, last = self.records[0], self.records[-1]
        self.assertEqual(list(first)[:3], ["type", "timeLogged", "timeQueued"])
        self.assertEqual(list(last)[:3], ["type", "timeLogged", "header_X-Sp-Message-Id"])
        # Same name, any case, whichever header the record came under.
        self.assertEqual(first["header_x-sp-message-id"], "5e847c40a1b2c3d4e5f6")
        self.assertEqual(last["header_x-sp-message-id"], "5e84828ca8b9c0d1e2f3")
        self.assertEqual(last["HEADER_X-SP-MESSAGE-ID"], "5e84828ca8b9c0d1e2f3")
        self.assertEqual(last["vmtapool"], "")

    def test_delivery_facts_of_the_sample(self) -> None:
        facts = [f for f in map(delivery_facts, self.records) if f is not None]
        self.assertEqual(len(facts), 8)
        self.assertEqual(
            facts[0],
            DeliveryFacts(
                message_id="5e847c40a1b2c3d4e5f6",
                rcpt="alice@example.org",
                friendly_from="bounces@mail.example.com",
                campaign_id="spring-sale",
                subaccount_id=42,
                sending_ip="203.0.113.10",
                ip_pool="pool-a",
                routing_domain="example.org",
                delivered_at=1585740896,  # 2020-04-01 11:34:56 UTC
            ),
        )
        reasons = [skip_reason(r) for r in self.records if r.type == "d"]
        self.assertEqual(reasons.count(SkipReason.NO_MESSAGE_ID), 1)
        self.assertEqual(reasons.count(SkipReason.BAD_MESSAGE_ID), 1)
        self.assertEqual(reasons.count(None), 8)
        # Under the second header: other column order, mixed-case header names.
        sybil = next(f for f in facts if f.rcpt == "sybil@Example.ORG")
        self.assertEqual(sybil.routing_domain, "example.org")
        self.assertEqual(sybil.campaign_id, "autumn-sale")
        self.assertEqual(sybil.subaccount_id, 43)
        self.assertEqual(sybil.delivered_at, 1585742571)  # 08:02:51-0400 = 12:02:51 UTC

    def test_split_at_every_byte_offset(self) -> None:
        whole = outcome(self.parser, self.records)
        for cut in range(1, len(self.data)):
            p = AccountingParser()
            out = p.feed(self.data[:cut]) + p.feed(self.data[cut:]) + p.finish()
            self.assertEqual(outcome(p, out), whole, f"cut at {cut}")

    def test_one_byte_at_a_time(self) -> None:
        p, records = parse(self.data, [1])
        self.assertEqual(outcome(p, records), outcome(self.parser, self.records))

    def test_bare_lf_line_ends(self) -> None:
        lf = self.data.replace(b"\r\n", b"\n")
        p, records = parse(lf, [7, 300, 1])
        self.assertEqual(p.counts.records, 25)
        self.assertEqual(p.counts.malformed, 0)
        # Only the line ends inside the quoted diag changed.
        dave = next(r for r in records if r["rcpt"] == "dave@example.com")
        self.assertIn("message is\n550-5.7.1", dave["dsnDiag"])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 200), min_size=1, max_size=20))
    def test_any_chunking_same_outcome(self, sizes: list[int]) -> None:
        p, records = parse(self.data, sizes)
        self.assertEqual(outcome(p, records), outcome(self.parser, self.records))


class StreamTests(SynchronousTestCase):
    """Headers, counts, and the malformed cases, one at a time."""

    def test_empty_input(self) -> None:
        p, records = parse(b"")
        self.assertEqual(records, [])
        self.assertEqual(p.counts, ParseCounts())
        self.assertEqual(p.finish(), [])
        self.assertIsNone(p.header)

    def test_header_only(self) -> None:
        p, records = parse(HEADER)
        self.assertEqual(records, [])
        self.assertEqual(p.counts.headers, 1)
        assert p.header is not None
        self.assertEqual(p.header.names[-1], "header_x-sp-message-id")

    def test_data_before_header_is_skipped(self) -> None:
        p, records = parse(GOOD + GOOD + HEADER + GOOD)
        self.assertEqual(len(records), 1)
        self.assertEqual(p.counts.before_header, 2)
        self.assertEqual(p.counts.malformed, 0)

    def test_last_record_without_line_end(self) -> None:
        p = AccountingParser()
        self.assertEqual(len(p.feed(HEADER + GOOD[:-2])), 0)
        records = p.finish()
        self.assertEqual([r["rcpt"] for r in records], ["to@example.org"])
        self.assertEqual(p.buffered, 0)

    def test_crlf_split_between_chunks(self) -> None:
        p = AccountingParser()
        self.assertEqual(p.feed(HEADER + GOOD[:-1]), [])
        [record] = p.feed(b"\n")
        self.assertEqual(record["header_x-sp-message-id"], "0123456789abcdef0123")

    def test_header_resent_with_another_order(self) -> None:
        other = b"type,header_x-sp-message-id,rcpt\r\nd,abc,x@example.com\r\n"
        p, records = parse(HEADER + GOOD + other + GOOD)
        self.assertEqual(p.counts.headers, 2)
        self.assertEqual(records[0]["rcpt"], "to@example.org")
        self.assertEqual(
            records[1], {"type": "d", "header_x-sp-message-id": "abc", "rcpt": "x@example.com"}
        )
        # GOOD has 8 fields: wrong under the 3-field header now in force.
        self.assertEqual(len(records), 2)
        self.assertEqual(p.counts.malformed_by_reason, {"field-count": 1})

    def test_wrong_field_count(self) -> None:
        p, records = parse(HEADER + b"d,1,2\r\n" + GOOD + GOOD[:-2] + b",extra\r\n" + GOOD)
        self.assertEqual(len(records), 2)
        self.assertEqual(p.counts.malformed, 2)
        self.assertEqual(p.last_problem, "field-count: 9 fields, header has 8")

    def test_every_record_type_is_counted(self) -> None:
        rows = b"".join(
            t + b",1585740896,a@example.com,b@example.org,,,,\r\n"
            for t in (b"d", b"b", b"t", b"tq", b"r", b"f", b"rb", b"rs", b"zz", b"")
        )
        p, records = parse(HEADER + rows)
        self.assertEqual(len(records), 10)
        self.assertEqual(
            p.counts.by_type,
            {"d": 1, "b": 1, "t": 1, "tq": 1, "r": 1, "f": 1, "rb": 1, "rs": 1, "other": 2},
        )

    def test_quote_inside_an_unquoted_field(self) -> None:
        bad = b'd,2020-04-01,a@example.com,b"c@example.org,,,,\r\n'
        p, records = parse(HEADER + bad + GOOD)
        self.assertEqual(len(records), 1)
        self.assertEqual(p.counts.malformed_by_reason, {"bad-quoting": 1})
        # An even number of stray quotes too.
        p, records = parse(HEADER + bad.replace(b'b"c', b'b"c"') + GOOD)
        self.assertEqual((len(records), p.counts.malformed), (1, 1))

    def test_text_after_closing_quote(self) -> None:
        bad = b'd,2020-04-01,"a@example.com"x,b@example.org,,,,\r\n'
        p, records = parse(HEADER + bad + GOOD)
        self.assertEqual(len(records), 1)
        self.assertEqual(p.counts.malformed_by_reason, {"bad-quoting": 1})
        self.assertIn("bad-quoting", p.last_problem)

    def test_bad_quoting_in_a_multiline_record_resumes_after_that_line(self) -> None:
        bad = b'd,"a\r\nb"x,c,d,e,f,g,h\r\n'
        p, records = parse(HEADER + bad + GOOD)
        self.assertEqual(len(records), 1)
        self.assertEqual(p.counts.malformed, 1)

    def test_bare_cr_in_an_unquoted_field(self) -> None:
        bad = b"d,2020\r04,a,b,,,,\r\n"
        p, records = parse(HEADER + bad + GOOD + b'd,"x",a\rb,c,,,,\r\n')
        self.assertEqual(len(records), 1)
        self.assertEqual(p.counts.malformed_by_reason, {"bare-cr": 2})

    def test_invalid_utf8(self) -> None:
        bad = b"d,2020-04-01,\xff\xfe@example.com,b@example.org,,,,\r\n"
        multi = b'd,"\xc3(\r\nstill inside",a,b,,,,\r\n'
        p, records = parse(HEADER + bad + GOOD + multi + GOOD)
        self.assertEqual(len(records), 2)
        self.assertEqual(p.counts.malformed_by_reason, {"invalid-utf8": 2})
        # Valid UTF-8 is fine, anywhere.
        p, records = parse(HEADER + GOOD.replace(b"job1", "réseau-été".encode()))
        self.assertEqual(records[0]["jobId"], "réseau-été")

    def test_garbage_and_binary_lines(self) -> None:
        junk = (
            b"\x00\x01\x02 binary \x7f\x80\x81\r\n"
            b"<html>not csv at all</html>\r\n"
            b'"unbalanced, "quo"tes,\r\n'
            b"\r\n"
            b",,,,,,,,,,,,,,,,,,,,,,,,,,\r\n"
        )
        p, records = parse(HEADER + GOOD + junk + GOOD)
        self.assertEqual(len(records), 2)
        self.assertEqual(p.counts.malformed, 4)
        self.assertEqual(p.counts.blank, 1)
        self.assertTrue(p.last_problem)

    def test_header_is_matched_only_on_a_literal_type(self) -> None:
        p, records = parse(HEADER + b"Type,x\r\n" + b'"type",a,b\r\n' + GOOD)
        # "Type" is a data line with the wrong width; a quoted "type" is still "type".
        self.assertEqual(p.counts.headers, 2)
        self.assertEqual(p.counts.malformed, 2)
        self.assertEqual(records, [])

    def test_unterminated_quote_at_end_of_input(self) -> None:
        p, records = parse(HEADER + GOOD + b'd,"never closed,a,b\r\nmore')
        self.assertEqual(len(records), 1)
        self.assertEqual(p.counts.malformed_by_reason, {"unterminated-quote": 1})
        self.assertEqual(p.buffered, 0)

    def test_counts_snapshot_does_not_change(self) -> None:
        p = AccountingParser()
        p.feed(HEADER + GOOD)
        snap = p.counts.snapshot()
        p.feed(GOOD + b"x\r\n")
        self.assertEqual((snap.records, snap.by_type, snap.malformed), (1, {"d": 1}, 0))
        self.assertEqual((p.counts.records, p.counts.by_type), (2, {"d": 2}))

    def test_max_record_bytes_must_be_sane(self) -> None:
        self.assertRaises(ValueError, AccountingParser, max_record_bytes=10)


class OversizeTests(SynchronousTestCase):
    """No record makes the parser buffer more than max_record_bytes."""

    LIMIT = 1024

    def test_long_line_is_dropped_in_one_piece(self) -> None:
        long = b"d," + b"x" * 5000 + b",a,b,c,d,e,f\r\n"
        p, records = parse(HEADER + GOOD + long + GOOD, max_record_bytes=self.LIMIT)
        self.assertEqual(len(records), 2)
        self.assertEqual(p.counts.malformed_by_reason, {"too-long": 1})

    def test_long_line_fed_in_small_chunks_is_never_buffered(self) -> None:
        p = AccountingParser(max_record_bytes=self.LIMIT)
        p.feed(HEADER)
        for _ in range(1000):
            p.feed(b"y" * 100)
            self.assertLess(p.buffered, self.LIMIT)
        records = p.feed(b"\r\n" + GOOD) + p.finish()
        self.assertEqual(len(records), 1)
        self.assertEqual(p.counts.malformed_by_reason, {"too-long": 1})

    def test_limit_is_inclusive_of_the_line_end(self) -> None:
        # Up to max_record_bytes with the line end (LF or CRLF) is fine.
        body = b"d," + b"x" * (self.LIMIT - 16) + b",a,b,c,d,e,f"
        self.assertEqual(len(body + b"\r\n"), self.LIMIT)
        for extra, kept in ((b"\n", 1), (b"\r\n", 1), (b"z\r\n", 0)):
            for sizes in (None, [1], [333]):
                _, records = parse(HEADER + body + extra, sizes, max_record_bytes=self.LIMIT)
                self.assertEqual(len(records), kept, (extra, sizes))

    def test_unterminated_quote_costs_at_most_the_limit(self) -> None:
        opened = b'd,"this quote is never closed,a,b,c,d,e,f\r\n'
        lines = [b"d,2020,a,b%d@example.org,,,,\r\n" % i for i in range(400)]
        stream = HEADER + opened + b"".join(lines)
        for sizes in (None, [64], [1, 5000]):
            p, records = parse(stream, sizes, max_record_bytes=self.LIMIT)
            self.assertEqual(p.counts.malformed_by_reason, {"too-long": 1})
            # What was lost fits in the limit; everything after the resync point is back.
            lost = sum(len(x) for x in lines[: 400 - len(records)])
            self.assertLess(lost, self.LIMIT)
            self.assertEqual(records[-1]["rcpt"], "b399@example.org")
            self.assertEqual(p.buffered, 0)

    def test_oversize_multiline_record_same_in_any_chunking(self) -> None:
        big = b'd,"' + b"line of a huge diag\r\n" * 100 + b'",a,b,c,d,e,f\r\n'
        stream = HEADER + GOOD + big + GOOD
        whole = outcome(*parse(stream, max_record_bytes=self.LIMIT))
        for sizes in ([1], [7], [1000], [3, 1500]):
            self.assertEqual(outcome(*parse(stream, sizes, max_record_bytes=self.LIMIT)), whole)


# -- generated streams ---------------------------------------------------------

_field_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(',"\r\n ;@.-')),
        st.characters(codec="utf-8", exclude_characters="\x00"),
    ),
    max_size=12,
)
_types = st.sampled_from(["d", "b", "t", "tq", "r", "f", "rb", "rs"])


@st.composite
def _tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    names = ["type", *draw(st.lists(_field_text, min_size=1, max_size=6))]
    rows = draw(
        st.lists(
            st.builds(
                lambda t, rest: [t, *rest],
                _types,
                st.lists(_field_text, min_size=len(names) - 1, max_size=len(names) - 1),
            ),
            max_size=8,
        )
    )
    return names, rows


def _write(
    names: list[str], rows: list[list[str]], terminator: str, quoting: int = csv.QUOTE_MINIMAL
) -> bytes:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator=terminator, quoting=quoting).writerows([names, *rows])
    return out.getvalue().encode("utf-8")


class GeneratedTests(SynchronousTestCase):
    """Round trips of what csv.writer produces, and arbitrary bytes."""

    @settings(max_examples=150, deadline=None)
    @given(
        _tables(),
        # With an LF terminator csv.writer leaves a CR unquoted, which RFC 4180 (and
        # this parser) reject; PMTA writes CRLF. So LF only with every field quoted.
        st.sampled_from(
            [("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)]
        ),
        st.lists(st.integers(1, 40), min_size=1, max_size=8),
    )
    def test_csv_writer_round_trip(
        self,
        table: tuple[list[str], list[list[str]]],
        style: tuple[str, int],
        sizes: list[int],
    ) -> None:
        names, rows = table
        data = _write(names, rows, *style)
        p, records = parse(data, sizes)
        self.assertEqual(p.counts.malformed, 0, p.last_problem)
        self.assertEqual(p.counts.headers, 1)
        self.assertEqual([list(r.raw) for r in records], rows)
        self.assertEqual(sum(p.counts.by_type.values()), len(rows))

    def test_unquoted_cr_from_csv_writer_is_rejected(self) -> None:
        data = _write(["type", "x"], [["d", "a\rb"], ["d", "ok"]], "\n")
        self.assertEqual(data, b"type,x\nd,a\rb\nd,ok\n")
        p, records = parse(data)
        self.assertEqual([r["x"] for r in records], ["ok"])
        self.assertEqual(p.counts.malformed_by_reason, {"bare-cr": 1})

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b'"',
                    b",",
                    b"\r",
                    b"\n",
                    b"\r\n",
                    b"a",
                    b"type",
                    b"d",
                    b"\xff",
                    b"\xc3\xa9",
                    b'""',
                    b"type,a,b\r\n",
                    b"d,x,y\r\n",
                    b'd,"x\r\ny",z\n',
                    b"x" * 30,
                    b'"' + b"y" * 40,
                    b'"a\nb\nc\nd\ne\nf',
                    b"e\r\n" * 5,
                    b',"',
                    b'",',
                ]
            ),
            max_size=60,
        ),
        st.lists(st.integers(1, 30), min_size=1, max_size=6),
    )
    # A line past the limit is too long whatever else is wrong with it.
    @example([b'"', b"x" * 30, b'"' + b"y" * 40, b'd,"x\r\ny",z\n'], [1])
    # Stray quote, then a quote left open: csv must not wait for more lines.
    @example([b"a", b'"', b'd,"x\r\ny",z\n'], [1])
    def test_arbitrary_bytes_any_chunking(self, pieces: list[bytes], sizes: list[int]) -> None:
        data = b"".join(pieces)
        whole = outcome(*parse(data, max_record_bytes=64))
        p, records = parse(data, sizes, max_record_bytes=64)
        self.assertEqual(outcome(p, records), whole)
        self.assertLessEqual(
            p.counts.records
            + p.counts.headers
            + p.counts.malformed
            + p.counts.before_header
            + p.counts.blank,
            data.count(b"\n") + 1,
        )


# -- delivery facts ------------------------------------------------------------


def record(**fields: str) -> Record:
    """A record parsed from a header and one line with these fields (type "d" unless
    given)."""
    if "type" not in fields:
        fields = {"type": "d", **fields}
    p = AccountingParser()
    [rec] = p.feed(_write(list(fields), [list(fields.values())], "\r\n"))
    return rec


FULL = {
    "timeLogged": "2020-04-01 12:34:56+0100",
    "orig": "bounces@mail.example.com",
    "rcpt": "Someone@Example.COM",
    "jobId": "spring-sale",
    "header_x-job": "ignored-when-jobId-is-set",
    "header_x-sp-subaccount-id": "42",
    "dlvSourceIp": "203.0.113.10",
    "vmtaPool": "pool-a",
    "header_x-sp-message-id": "5e847c40a1b2c3d4e5f6",
}


class DeliveryFactsTests(SynchronousTestCase):
    def test_every_field(self) -> None:
        self.assertEqual(
            delivery_facts(record(**FULL)),
            DeliveryFacts(
                message_id="5e847c40a1b2c3d4e5f6",
                rcpt="Someone@Example.COM",
                friendly_from="bounces@mail.example.com",
                campaign_id="spring-sale",
                subaccount_id=42,
                sending_ip="203.0.113.10",
                ip_pool="pool-a",
                routing_domain="example.com",
                delivered_at=1585740896,
            ),
        )
        self.assertIsNone(skip_reason(record(**FULL)))

    def test_header_names_any_case(self) -> None:
        shouted = {k.upper(): v for k, v in FULL.items()}
        facts = delivery_facts(record(**shouted))
        self.assertEqual(facts, delivery_facts(record(**FULL)))

    def test_campaign_falls_back_to_x_job(self) -> None:
        facts = delivery_facts(record(**{**FULL, "jobId": ""}))
        assert facts is not None
        self.assertEqual(facts.campaign_id, "ignored-when-jobId-is-set")
        without = {k: v for k, v in FULL.items() if k not in ("jobId", "header_x-job")}
        facts = delivery_facts(record(**without))
        assert facts is not None
        self.assertEqual(facts.campaign_id, "")

    def test_subaccount(self) -> None:
        for value, expected in (
            ("7", 7),
            ("0", 0),
            ("", None),
            ("abc", None),
            ("-3", None),
            ("1.5", None),
            ("9" * 19, None),
            (" 12 ", 12),
        ):
            facts = delivery_facts(record(**{**FULL, "header_x-sp-subaccount-id": value}))
            assert facts is not None
            self.assertEqual(facts.subaccount_id, expected, value)
        only = {k: v for k, v in FULL.items() if k != "header_x-sp-subaccount-id"}
        facts = delivery_facts(record(**only))
        assert facts is not None
        self.assertIsNone(facts.subaccount_id)

    def test_missing_columns_give_empty_values(self) -> None:
        facts = delivery_facts(record(rcpt="a@b.example", **{"header_x-sp-message-id": "m1"}))
        self.assertEqual(
            facts,
            DeliveryFacts("m1", "a@b.example", "", "", None, "", "", "b.example", None),
        )

    def test_rcpt_angle_brackets_and_domain(self) -> None:
        facts = delivery_facts(record(**{**FULL, "rcpt": "<x@Sub.Example.NET>"}))
        assert facts is not None
        self.assertEqual(
            (facts.rcpt, facts.routing_domain), ("x@Sub.Example.NET", "sub.example.net")
        )
        facts = delivery_facts(record(**{**FULL, "rcpt": "postmaster"}))
        assert facts is not None
        self.assertEqual(facts.routing_domain, "")

    def test_message_id_rules(self) -> None:
        for value, reason in (
            ("5e847c40a1b2c3d4e5f6", None),
            ("00000deadbeeff00d1337", None),  # legacy Go id: 21 characters
            ("SparkPost-Id.1234_abc", None),
            ("x" * 64, None),
            ("x" * 65, SkipReason.BAD_MESSAGE_ID),
            ("two words", SkipReason.BAD_MESSAGE_ID),
            ("tab\there", SkipReason.BAD_MESSAGE_ID),
            ("clé", SkipReason.BAD_MESSAGE_ID),
            ("", SkipReason.NO_MESSAGE_ID),
            ("   ", SkipReason.NO_MESSAGE_ID),
        ):
            rec = record(**{**FULL, "header_x-sp-message-id": value})
            self.assertEqual(skip_reason(rec), reason, value)
            self.assertEqual(delivery_facts(rec) is None, reason is not None, value)
        self.assertFalse(valid_message_id(""))
        no_column = {k: v for k, v in FULL.items() if k != "header_x-sp-message-id"}
        self.assertEqual(skip_reason(record(**no_column)), SkipReason.NO_MESSAGE_ID)

    def test_other_types_and_missing_rcpt(self) -> None:
        for t in ("b", "t", "tq", "r", "f", "rb", "rs"):
            rec = record(type=t, **FULL)
            self.assertIsNone(delivery_facts(rec))
            self.assertEqual(skip_reason(rec), SkipReason.NOT_DELIVERY)
        rec = record(**{**FULL, "rcpt": ""})
        self.assertIsNone(delivery_facts(rec))
        self.assertEqual(skip_reason(rec), SkipReason.NO_RCPT)

    def test_time_logged_formats(self) -> None:
        for value, expected in (
            ("2020-04-01 12:34:56+0100", 1585740896),
            ("2020-04-01 07:34:56-0400", 1585740896),
            ("2020-04-01T11:34:56Z", 1585740896),
            ("2020-04-01 11:34:56+00:00", 1585740896),
            ("1585740896", 1585740896),
            ("2020-04-01 11:34:56", None),  # no offset: which time zone?
            ("yesterday", None),
            ("", None),
        ):
            self.assertEqual(parse_pmta_time(value), expected, value)
            facts = delivery_facts(record(**{**FULL, "timeLogged": value}))
            assert facts is not None
            self.assertEqual(facts.delivered_at, expected, value)


class RecordTests(SynchronousTestCase):
    def test_mapping_behaviour(self) -> None:
        rec = record(**FULL)
        self.assertEqual(rec.type, "d")
        self.assertEqual(len(rec), len(FULL) + 1)
        self.assertEqual(list(rec), ["type", *FULL])
        self.assertIn("RCPT", rec)
        self.assertNotIn("nope", rec)
        self.assertEqual(rec.get("nope", "dflt"), "dflt")
        self.assertRaises(KeyError, lambda: rec["nope"])
        self.assertEqual(rec.raw[:2], ("d", FULL["timeLogged"]))
        self.assertIn("spring-sale", repr(rec))

    def test_repeated_column_name_refers_to_the_first(self) -> None:
        p = AccountingParser()
        [rec] = p.feed(b"type,rcpt,x,RCPT\r\nd,first,1,second\r\n")
        self.assertEqual(rec["rcpt"], "first")
        self.assertEqual(rec["RCPT"], "second")  # exact spelling wins
        self.assertEqual(dict(rec), {"type": "d", "rcpt": "first", "x": "1", "RCPT": "second"})
