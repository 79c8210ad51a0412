"""Tests for sparkytwist.html: link rewriting and pixel insertion in decoded HTML."""

from __future__ import annotations

import html as stdlib_html

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.html import (
    decode_attribute,
    initial_block,
    open_pixel,
    rewrite_html,
    scan_html,
    trackable_url,
)


class Recorder:
    """A make_url that remembers its calls and returns short, predictable URLs."""

    def __init__(self, base: str = "https://t.example/") -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.base = base

    def __call__(self, action: str, url: str | None) -> str:
        self.calls.append((action, url))
        return f"{self.base}{action}{len(self.calls)}"


def links_only(text: str) -> tuple[str, Recorder]:
    rec = Recorder()
    result = rewrite_html(text, make_url=rec, opens=False, clicks=True)
    # clicks also add the honeypot block; take it out to compare the links alone
    honeypot = initial_block(None, f"https://t.example/h{len(rec.calls)}")
    return result.text.replace(honeypot, "", 1), rec


class DecodeAttributeTests(SynchronousTestCase):
    def test_browser_rules(self) -> None:
        """Character references decode as in an HTML5 attribute value."""
        cases = {
            "a&amp;b": "a&b",
            "a&#38;b": "a&b",
            "a&#x26;b": "a&b",
            "a&#38b": "a&b",  # numeric without ';' still decodes
            "?x=1&region=eu": "?x=1&region=eu",  # legacy &reg + alnum: kept
            "?x=1&reg=1": "?x=1&reg=1",  # legacy &reg + '=': kept
            "?x=1&reg": "?x=1\u00ae",  # at the end: decoded
            "&reg;ion": "\u00aeion",
            "&notit;": "&notit;",  # &not + alnum: kept
            "&notin;": "\u2209",
            "&lt&gt": "<>",
            "&ampx": "&ampx",
            "&amp;x": "&x",
            "&unknown;": "&unknown;",
            "&": "&",
            "&;": "&;",
            "&#;": "&#;",
            "&#x;": "&#x;",
            "&#0;": "\ufffd",
            "&#x80;": "\u20ac",  # C1 control: the Windows-1252 character
            "&#x81;": "\x81",
            "&#xD800;": "\ufffd",
            "&#x110000;": "\ufffd",
            "&#99999999999999999999;": "\ufffd",
            "&#x00000000041;": "A",
            "&NotNestedGreaterGreater;": "\u2aa2\u0338",
            "no refs": "no refs",
        }
        for raw, expected in cases.items():
            self.assertEqual(decode_attribute(raw), expected, raw)

    def test_differs_from_html_unescape(self) -> None:
        """The reason this function exists: html.unescape decodes &region."""
        self.assertEqual(stdlib_html.unescape("a=1&region=eu"), "a=1\u00aeion=eu")
        self.assertEqual(decode_attribute("a=1&region=eu"), "a=1&region=eu")


class TrackableUrlTests(SynchronousTestCase):
    def test_http_and_https(self) -> None:
        self.assertEqual(trackable_url("http://a.example/"), "http://a.example/")
        self.assertEqual(trackable_url("HTTPS://A.example/x"), "HTTPS://A.example/x")
        self.assertEqual(trackable_url("  \n https://a.example/?a=1&amp;b=2 \t"),
                         "https://a.example/?a=1&b=2")  # fmt: skip
        self.assertEqual(trackable_url("https://a.exa\nmple/"), "https://a.example/")

    def test_everything_else_is_left_alone(self) -> None:
        for raw in [
            "mailto:a@example.com", "tel:+1555", "#top", "", "/relative", "relative.html",
            "//example.com/x", "{{url}}", "%%url%%", "*|URL|*", "javascript:alert(1)",
            "ftp://example.com/", "http:/example.com", "https:example.com", "{{ url }}",
            "[[url]]", "$url$", "data:text/html,x",
        ]:  # fmt: skip
            self.assertIsNone(trackable_url(raw), raw)


class RewriteLinksTests(SynchronousTestCase):
    def test_quoting_styles_keep_their_quotes(self) -> None:
        """Only the value changes; double, single and unquoted values stay so."""
        text = (
            '<p>x</p><a class="b" href="http://e.com/1">1</a>\n'
            "<A HREF='https://e.com/2'>2</A>\n"
            "<a href=http://e.com/3 target=_blank>3</a>\n"
            '<area shape="rect" href = "http://e.com/4">\n'
            '<AREA\nHREF="http://e.com/5"/>\n'
        )
        out, rec = links_only(text)
        self.assertEqual(
            out,
            '<p>x</p><a class="b" href="https://t.example/c1">1</a>\n'
            "<A HREF='https://t.example/c2'>2</A>\n"
            "<a href=https://t.example/c3 target=_blank>3</a>\n"
            '<area shape="rect" href = "https://t.example/c4">\n'
            '<AREA\nHREF="https://t.example/c5"/>\n',
        )
        self.assertEqual(
            [u for _, u in rec.calls[:5]],
            ["http://e.com/1", "https://e.com/2", "http://e.com/3", "http://e.com/4",
             "http://e.com/5"],
        )  # fmt: skip

    def test_make_url_gets_the_decoded_url(self) -> None:
        text = (
            '<a href="https://e.com/?a=1&amp;b=2&region=eu&#38;c=&#x33;">x</a>'
            "<a href=' https://e.com/y '>y</a>"
        )
        _, rec = links_only(text)
        self.assertEqual(
            rec.calls[:2],
            [("c", "https://e.com/?a=1&b=2&region=eu&c=3"), ("c", "https://e.com/y")],
        )

    def test_new_url_is_escaped_for_its_quoting(self) -> None:
        def make_url(action: str, url: str | None) -> str:
            return "https://t.example/?a=1&b='2'\"x" if action == "c" else "https://t/h"

        text = "<a href=\"http://e.com/\">1</a><a href='http://e.com/'>2</a><a href=http://e.com/>3</a>"
        out = rewrite_html(text, make_url=make_url, opens=False, clicks=True).text
        self.assertIn("<a href=\"https://t.example/?a=1&amp;b='2'&quot;x\">1</a>", out)
        self.assertIn("<a href='https://t.example/?a=1&amp;b=&#39;2&#39;\"x'>2</a>", out)
        # an unquoted value that would break is quoted
        self.assertIn("<a href=\"https://t.example/?a=1&amp;b='2'&quot;x\">3</a>", out)

    def test_other_links_untouched(self) -> None:
        text = (
            '<a href="mailto:x@e.com">m</a><a href="tel:1">t</a><a href="#a">h</a>'
            '<a href="{{url}}">p</a><a href="%%u%%">p</a><a href="*|U|*">p</a>'
            '<a href="javascript:void(0)">j</a><a href="/rel">r</a><a>no href</a>'
            "<a href>empty</a><a href=>empty</a><abbr href='http://e.com'>abbr</abbr>"
            '<link href="http://e.com/style.css"><img src="http://e.com/i.png">'
        )
        out, rec = links_only(text)
        self.assertEqual(out, text)
        self.assertEqual(rec.calls, [("h", None)])

    def test_notrack_markers(self) -> None:
        """Marked links are left exactly as they are."""
        text = (
            '<a data-sparky-notrack href="http://e.com/1">1</a>'
            '<a href="http://e.com/2" DATA-SPARKY-NOTRACK="yes">2</a>'
            '<a href="http://e.com/3" data-msys-clicktrack="0">3</a>'
            "<a href='http://e.com/4' data-msys-clicktrack=0>4</a>"
            '<a href="http://e.com/5" data-msys-clicktrack="1">5</a>'
        )
        out, rec = links_only(text)
        self.assertEqual(out, text.replace("http://e.com/5", "https://t.example/c1"))
        self.assertEqual(rec.calls[0], ("c", "http://e.com/5"))

    def test_skips_comments_scripts_styles(self) -> None:
        text = (
            '<!-- <a href="http://e.com/c"> --><!--[if mso]><a href="http://e.com/mso">'
            "</a><![endif]--><script>x = \"<a href='http://e.com/s'>\";</script>"
            '<style>a[href="http://e.com/st"]{}</style><SCRIPT type="x">'
            '<a href="http://e.com/s2"></Script ><title><a href="http://e.com/t"></title>'
            '<a href="http://e.com/real">r</a><!--> <a href="http://e.com/after-empty">'
        )
        out, rec = links_only(text)
        self.assertEqual([u for a, u in rec.calls if a == "c"],
                         ["http://e.com/real", "http://e.com/after-empty"])  # fmt: skip
        self.assertEqual(
            out,
            text.replace('"http://e.com/real"', '"https://t.example/c1"').replace(
                '"http://e.com/after-empty"', '"https://t.example/c2"'
            ),
        )

    def test_gt_inside_quoted_attribute(self) -> None:
        text = (
            '<img alt="<a href=\'http://e.com/no\'>"><a title="a > b" href="http://e.com/yes">'
            "<div data-x='<a href=http://e.com/no2>'></div>"
        )
        _, rec = links_only(text)
        self.assertEqual([u for a, u in rec.calls if a == "c"], ["http://e.com/yes"])

    def test_tags_named_like_special_ones(self) -> None:
        """Tags sharing a prefix with a, area, body, script... are skipped quotes and all."""
        text = (
            "<abbr title=\"<a href='http://e.com/no1'>\"><ARTICLE data-x='<a href=http://e.com/no2>'>"
            '<strong title="<body>"><b title="</body>"><areas x="<a href=http://e.com/no3>">'
            '<scripts><a href="http://e.com/yes">y</a></scripts><bodyx title=">">'
        )
        out, rec = links_only(text)
        self.assertEqual([u for a, u in rec.calls if a == "c"], ["http://e.com/yes"])
        self.assertEqual(out, text.replace("http://e.com/yes", "https://t.example/c1"))
        result = rewrite_html(text, make_url=Recorder(), opens=True, clicks=False)
        self.assertTrue(result.text.startswith("<div"))  # no <body>: block at the start

    def test_edits_report_the_replaced_spans(self) -> None:
        text = '<body><a href="http://e.com/">x</a></body>'
        result = rewrite_html(text, make_url=Recorder(), opens=False, clicks=True)
        honeypot, (start, end, new) = result.edits
        self.assertEqual((text[start:end], new), ("http://e.com/", "https://t.example/c1"))
        self.assertEqual(honeypot[:2], (6, 6))

    def test_first_href_wins(self) -> None:
        """Like a browser, the first of duplicate attributes is the one used."""
        out, rec = links_only('<a href="http://e.com/1" href="http://e.com/2">x</a>')
        self.assertEqual(out, '<a href="https://t.example/c1" href="http://e.com/2">x</a>')
        self.assertEqual(rec.calls[0], ("c", "http://e.com/1"))

    def test_broken_markup_does_not_stop_the_scan(self) -> None:
        text = (
            'a < b <a =x href="http://e.com/bad">x</a> 3<4 </ x> <? pi ?> <!doctype html>'
            '<a href="http://e.com/ok">ok</a> <a href="http://e.com/open'
        )
        out, rec = links_only(text)
        self.assertEqual([u for a, u in rec.calls if a == "c"], ["http://e.com/ok"])
        self.assertEqual(out, text.replace("http://e.com/ok", "https://t.example/c1"))

    def test_make_url_failure_leaves_the_link(self) -> None:
        def make_url(action: str, url: str | None) -> str:
            if url == "http://e.com/boom":
                raise ValueError("too long")
            return "https://t/" + action

        text = '<body><a href="http://e.com/boom">1</a><a href="http://e.com/ok">2</a></body>'
        result = rewrite_html(text, make_url=make_url, opens=False, clicks=True)
        self.assertEqual(result.links, 1)
        self.assertEqual(result.failures, 1)
        self.assertIn('<a href="http://e.com/boom">1</a><a href="https://t/c">2</a>', result.text)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class ScanOnceTests(SynchronousTestCase):
    """scan_html once, then one rewrite per recipient (the wrapper's multi-recipient path)."""

    TEXT = (
        '<html><head></head><BODY><a href="http://e.com/1">1</a><!-- <a href="http://e.com/c"> -->'
        "<A HREF='https://e.com/2?a=1&amp;b=2'>2</A><a href=http://e.com/3>3</a></BODY></html>"
    )

    def test_each_rewrite_is_rewrite_html(self) -> None:
        for opens, clicks, amp in [(True, True, False), (True, False, False),
                                   (False, True, True), (False, False, False)]:  # fmt: skip
            scan = scan_html(self.TEXT, opens=opens, clicks=clicks, amp=amp)
            for base in ("https://t.example/", "https://other.example/x?y=1&z=\"'/"):
                once, direct = Recorder(base), Recorder(base)
                self.assertEqual(
                    scan.rewrite(once),
                    rewrite_html(self.TEXT, make_url=direct, opens=opens, clicks=clicks, amp=amp),
                )
                self.assertEqual(once.calls, direct.calls)

    def test_failures_are_per_rewrite(self) -> None:
        scan = scan_html(self.TEXT, opens=True, clicks=True)

        def broken(action: str, url: str | None) -> str:
            raise ValueError("no key")

        failed = scan.rewrite(broken)
        self.assertEqual((failed.text, failed.links, failed.pixels, failed.failures),
                         (self.TEXT, 0, 0, 4))  # fmt: skip
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 4)
        ok = scan.rewrite(Recorder())
        self.assertEqual((ok.links, ok.pixels, ok.failures), (3, 2, 0))

    def test_tag_names_fold_case_as_before(self) -> None:
        # The tokenizer matches tag names without regard to case, with Python's
        # Unicode case folding ("\u017f" LONG S folds to "s"): unchanged when the
        # case-insensitive flag was narrowed to the tag names.
        text = (
            '<ScRiPt><a href="http://e.com/s"></SCRIPT>'
            '<\u017ftyle><a href="http://e.com/st"></\u017fTYLE>'
            "<Td><A HREF=http://e.com/1>1</a></tD>"
        )
        result = rewrite_html(text, make_url=Recorder(), opens=False, clicks=False)
        self.assertEqual(result.text, text)
        rec = Recorder()
        rewrite_html(text, make_url=rec, opens=False, clicks=True)
        self.assertEqual(rec.calls, [("c", "http://e.com/1"), ("h", None)])


class PixelTests(SynchronousTestCase):
    def rewrite(self, text: str, **kw: bool) -> tuple[str, str, str]:
        rec = Recorder()
        out = rewrite_html(text, make_url=rec, opens=True, clicks=True, **kw).text
        actions = {a: f"https://t.example/{a}{i}" for i, (a, _) in enumerate(rec.calls, 1)}
        amp = kw.get("amp", False)
        block = initial_block(actions.get("ai" if amp else "i"), actions.get("h"), amp=amp)
        pixel = open_pixel(actions["ao" if amp else "o"], amp=amp)
        return out, block, pixel

    def test_body_tag(self) -> None:
        text = '<html><head></head><BODY style="x">hi</BODY></html>'
        out, block, pixel = self.rewrite(text)
        self.assertEqual(out, f'<html><head></head><BODY style="x">{block}hi{pixel}</BODY></html>')

    def test_no_body_tag(self) -> None:
        out, block, pixel = self.rewrite("<html><head><title>t</title></head>hi</html>\n")
        self.assertEqual(out, f"<html><head><title>t</title></head>{block}hi{pixel}</html>\n")

    def test_fragment(self) -> None:
        out, block, pixel = self.rewrite("<p>hi</p>\n")
        self.assertEqual(out, f"{block}<p>hi</p>\n{pixel}")

    def test_one_pixel_even_with_body_in_comments_and_scripts(self) -> None:
        text = "<html><body><!-- <body> </body> --><script>'</body>'</script><p>x</p></body></html>"
        out, block, pixel = self.rewrite(text)
        self.assertEqual(out.count(block), 1)
        self.assertEqual(out.count(pixel), 1)
        self.assertTrue(out.startswith("<html><body>" + block + "<!-- <body> </body> -->"))
        self.assertTrue(out.endswith(f"<p>x</p>{pixel}</body></html>"))

    def test_initial_block_hides_a_honeypot(self) -> None:
        block = initial_block("https://t/i", "https://t/h")
        self.assertIn('<img src="https://t/i" width="1" height="1"', block)
        self.assertIn('<a href="https://t/h" tabindex="-1" aria-hidden="true"', block)
        self.assertIn("display:none", block)
        self.assertTrue(block.startswith("<div") and block.endswith("</div>"))

    def test_opens_only_or_clicks_only(self) -> None:
        rec = Recorder()
        text = '<body><a href="http://e.com/">x</a></body>'
        result = rewrite_html(text, make_url=rec, opens=True, clicks=False)
        self.assertEqual([a for a, _ in rec.calls], ["i", "o"])
        self.assertEqual(result.pixels, 2)
        self.assertIn('<a href="http://e.com/">', result.text)
        self.assertNotIn('tabindex="-1"', result.text)
        rec = Recorder()
        result = rewrite_html(text, make_url=rec, opens=False, clicks=True)
        self.assertEqual([a for a, _ in rec.calls], ["c", "h"])
        self.assertEqual(result.pixels, 0)
        self.assertNotIn("<img", result.text)
        self.assertIn('tabindex="-1"', result.text)
        result = rewrite_html(text, make_url=rec, opens=False, clicks=False)
        self.assertEqual(result.text, text)
        self.assertFalse(result.changed)

    def test_amp(self) -> None:
        rec = Recorder()
        text = '<html amp4email><body><a href="https://e.com/">x</a></body></html>'
        result = rewrite_html(text, make_url=rec, opens=True, clicks=True, amp=True)
        self.assertEqual(rec.calls, [("ac", "https://e.com/"), ("ai", None), ("ao", None)])
        self.assertEqual(
            result.text,
            '<html amp4email><body><amp-img src="https://t.example/ai2" width="1" height="1"'
            ' alt=""></amp-img><a href="https://t.example/ac1">x</a><amp-img'
            ' src="https://t.example/ao3" width="1" height="1" alt=""></amp-img></body></html>',
        )


_HTMLISH = st.lists(
    st.sampled_from([
        "<a href=", '"http://e.com/x"', "'https://e.com/'", "<body>", "</body>", "<!--", "-->",
        "<script>", "</script>", ">", "<", "&amp;", "&", " ", "\n", "x", "<area href=http://a",
        "</head>", "</html>", "<style>", "data-sparky-notrack", "=", "'", '"', "</", "<!",
    ]) | st.text(max_size=5),
    max_size=40,
).map("".join)  # fmt: skip


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_HTMLISH)
    def test_nothing_tracked_is_identity(self, text: str) -> None:
        rec = Recorder()
        result = rewrite_html(text, make_url=rec, opens=False, clicks=False)
        self.assertEqual(result.text, text)
        self.assertEqual(rec.calls, [])

    @settings(max_examples=300, deadline=None)
    @given(_HTMLISH)
    def test_only_pixels_added(self, text: str) -> None:
        """With opens only, removing the two inserted blocks gives back the input."""
        rec = Recorder()
        result = rewrite_html(text, make_url=rec, opens=True, clicks=False)
        block = initial_block("https://t.example/i1", None)
        pixel = open_pixel("https://t.example/o2")
        self.assertEqual(result.text.count(block), 1)
        self.assertEqual(result.text.count(pixel), 1)
        self.assertEqual(result.text.replace(block, "").replace(pixel, ""), text)

    @settings(max_examples=300, deadline=None)
    @given(_HTMLISH)
    def test_links_change_only_href_values(self, text: str) -> None:
        """Each tracked link's token replaces exactly its href value."""
        rec = Recorder(base="TRACKED")
        result = rewrite_html(text, make_url=rec, opens=False, clicks=True)
        clicks = [u for a, u in rec.calls if a == "c"]
        self.assertEqual(result.links, len(clicks))
        for url in clicks:
            assert url is not None
            self.assertTrue(url.lower().startswith(("http://", "https://")))
