"""The tracker's pure parts: client address, bot flags and policy, per-IP limit, Location."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.tracker.bots import BotClassifier, apply_policy
from sparkytwist.tracker.clientip import ClientAddress
from sparkytwist.tracker.location import to_uri
from sparkytwist.tracker.ratelimit import PerClientLimiter

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029; Pro)"


class ClientAddressTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resolver = ClientAddress(["127.0.0.0/8", "::1/128", "10.0.0.0/8"])

    def test_untrusted_peer_headers_ignored(self) -> None:
        self.assertEqual(
            self.resolver.resolve("198.51.100.7", b"1.2.3.4", b"5.6.7.8"), "198.51.100.7")

    def test_rightmost_untrusted_forwarded_address(self) -> None:
        # client-forged 6.6.6.6, real client 203.0.113.5, then two trusted proxies
        xff = b"6.6.6.6, 203.0.113.5, 10.1.1.1, 10.2.2.2"
        self.assertEqual(self.resolver.resolve("127.0.0.1", xff, None), "203.0.113.5")

    def test_all_trusted_gives_leftmost(self) -> None:
        self.assertEqual(self.resolver.resolve("127.0.0.1", b"10.0.0.9, 10.0.0.8", None),
                         "10.0.0.9")

    def test_ports_brackets_and_ipv6(self) -> None:
        self.assertEqual(self.resolver.resolve("::1", b"[2001:db8::1]:4711", None),
                         "2001:db8::1")
        self.assertEqual(self.resolver.resolve("127.0.0.1", b"203.0.113.5:8080", None),
                         "203.0.113.5")
        self.assertEqual(self.resolver.resolve("::ffff:127.0.0.1", b"203.0.113.5", None),
                         "203.0.113.5")

    def test_garbage_stops_at_last_vouched_address(self) -> None:
        self.assertEqual(self.resolver.resolve("127.0.0.1", b"evil, 10.0.0.3", None),
                         "10.0.0.3")
        self.assertEqual(self.resolver.resolve("127.0.0.1", b"unknown", None), "127.0.0.1")

    def test_real_ip_when_no_forwarded_for(self) -> None:
        self.assertEqual(self.resolver.resolve("127.0.0.1", None, b"203.0.113.77"),
                         "203.0.113.77")
        self.assertEqual(self.resolver.resolve("127.0.0.1", None, b"nonsense"), "127.0.0.1")

    def test_no_trusted_proxies(self) -> None:
        self.assertEqual(ClientAddress([]).resolve("127.0.0.1", b"1.2.3.4", None),
                         "127.0.0.1")


class BotTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bots = BotClassifier(cache_size=3)

    def test_people_and_mail_clients_unflagged(self) -> None:
        for agent in (CHROME, OUTLOOK, "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) "
                      "Gecko/20100101 Thunderbird/115.5.0"):
            self.assertEqual(self.bots.flags(agent), "", agent)

    def test_mail_proxies_are_p_not_bots(self) -> None:
        for agent in (GMAIL, YAHOO, "Mozilla/5.0"):
            self.assertEqual(self.bots.flags(agent), "p", agent)

    def test_crawlers_scanners_head_honeypot(self) -> None:
        self.assertEqual(self.bots.flags("Googlebot/2.1 (+http://www.google.com/bot.html)"),
                         "b")
        self.assertEqual(self.bots.flags("curl/8.1.2"), "b")
        self.assertEqual(self.bots.flags(""), "b")
        self.assertEqual(self.bots.flags("Mozilla/5.0 (compatible; Proofpoint URL Defense)"),
                         "f")
        self.assertEqual(self.bots.flags(CHROME, head=True), "f")
        self.assertEqual(self.bots.flags(GMAIL, head=True), "pf")
        self.assertEqual(self.bots.flags(CHROME, honeypot=True), "h")

    def test_cache_is_bounded_lru(self) -> None:
        for agent in (CHROME, GMAIL, YAHOO, CHROME, OUTLOOK):
            self.bots.classify(agent)
        self.assertEqual(len(self.bots), 3)
        self.assertEqual(self.bots.misses, 4)  # CHROME's second look was a hit
        self.bots.classify(CHROME)  # still cached: it was used recently
        self.assertEqual(self.bots.misses, 4)

    def test_policies(self) -> None:
        cases = {
            # flags: (keep, flag, drop)
            "": ("", "", ""),
            "p": ("p", "p", "p"),
            "b": ("", "b", None),
            "f": ("", "f", None),
            "pf": ("p", "pf", None),
            "h": ("", "h", None),
        }
        for flags, expected in cases.items():
            got = tuple(apply_policy(flags, policy) for policy in ("keep", "flag", "drop"))
            self.assertEqual(got, expected, flags)


class LimiterTests(SynchronousTestCase):
    def test_bucket_refills_at_rate(self) -> None:
        clock = task.Clock()
        limiter = PerClientLimiter(rate=2, burst=3, clock=clock)
        self.assertEqual([limiter.allow("a") for _ in range(5)],
                         [True, True, True, False, False])
        self.assertTrue(limiter.allow("b"))  # other clients are not affected
        clock.advance(0.5)  # one token back
        self.assertEqual([limiter.allow("a") for _ in range(2)], [True, False])
        clock.advance(10)  # never more than the burst
        self.assertEqual([limiter.allow("a") for _ in range(4)], [True, True, True, False])

    def test_zero_rate_is_off(self) -> None:
        limiter = PerClientLimiter(rate=0, burst=1, clock=task.Clock())
        self.assertTrue(all(limiter.allow("a") for _ in range(1000)))
        self.assertEqual(len(limiter), 0)

    def test_memory_bounded(self) -> None:
        limiter = PerClientLimiter(rate=1, burst=1, clock=task.Clock(), max_clients=100)
        for i in range(1000):
            limiter.allow(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(limiter), 100)


class LocationTests(SynchronousTestCase):
    def test_ascii_unchanged(self) -> None:
        for url in ("https://example.com/a?b=1&c=%C3%A9#top",
                    "https://example.com/p;x?a=1&a=2&b=&c#frag/ment?x",
                    "http://example.com:8080/+plus?q=a+b&r=%2F"):
            self.assertEqual(to_uri(url), url)

    def test_iri_as_a_browser_requests_it(self) -> None:
        self.assertEqual(
            to_uri("https://bücher.example/straße?q=café&x=1#frag ment"),
            "https://xn--bcher-kva.example/stra%C3%9Fe?q=caf%C3%A9&x=1#frag%20ment")
        self.assertEqual(
            to_uri("https://例え.テスト:8443/パス?ク=エ#フ"),
            "https://xn--r8jz45g.xn--zckzah:8443/%E3%83%91%E3%82%B9?%E3%82%AF=%E3%82%A8"
            "#%E3%83%95")
        self.assertEqual(to_uri('https://ex.com/a b?q="x"&y=<z>'),
                         "https://ex.com/a%20b?q=%22x%22&y=%3Cz%3E")
