"""The tracker resource: every status line and header, over DummyRequest and real HTTP."""

from __future__ import annotations

import base64
import datetime
from collections import Counter
from pathlib import Path
from typing import Any

import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest

from sparkytwist.listen import ListeningService
from sparkytwist.metrics import Metrics
from sparkytwist.token import TokenCodec
from sparkytwist.tracker.bots import BotClassifier
from sparkytwist.tracker.clientip import ClientAddress
from sparkytwist.tracker.ratelimit import PerClientLimiter
from sparkytwist.tracker.resource import PIXEL, TrackerResource, TrackerSite
from sparkytwist.trackevent import TrackEvent

KEY = "7:" + base64.b64encode(bytes(range(64))).decode()
OTHER_KEY = "8:" + base64.b64encode(bytes(range(64, 128))).decode()
MSG = "6745c3a0aabbccddeeff"
RCPT = "fred@example.com"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
LEGACY = ("eJxUzLEOQiEMRuF3-WciGAaTTr4JwbaIUSKBMhnf_Ybxnv18P2Q2EBgOltb4gFDN-iTvraotfs8Lfxsc2n"
          "yml4AQdqJZHqqlhCDXGG9wGNw3VYbK_fT-jwAAAP__f2Mg1g==")
NO_CACHE = b"no-cache, no-store, must-revalidate, max-age=0"
URL = "https://example.com/a?b=1&c=%C3%A9&d=e&f#top"


def codec(legacy: bool = False) -> TokenCodec:
    return TokenCodec.from_specs([KEY], accept_legacy=legacy)


CODEC = codec()


def token(action: str, url: str | None = None, rcpt: str = RCPT) -> bytes:
    return CODEC.encode(action, MSG, rcpt, url).encode()


class ListSink:
    def __init__(self) -> None:
        self.events: list[TrackEvent] = []
        self.drops: Counter[str] = Counter()

    def record(self, event: TrackEvent) -> bool:
        self.events.append(event)
        return True

    def dropped(self, reason: str, count: int = 1) -> None:
        self.drops[reason] += count


def make_resource(sink: ListSink, *, clock: Any = None, legacy: bool = False,
                  policy: str = "flag", rate: float = 0, burst: int = 50,
                  root: str = "", metrics: Metrics | None = None) -> TrackerResource:
    clock = clock or task.Clock()
    return TrackerResource(
        codec(legacy), sink, clock=clock, metrics=metrics or Metrics(),
        client_address=ClientAddress(["127.0.0.0/8", "::1/128"]), bots=BotClassifier(),
        limiter=PerClientLimiter(rate, burst, clock), bot_events=policy, root_redirect=root)


def hit(res: TrackerResource, path: bytes, method: bytes = b"GET",
        headers: dict[bytes, bytes] | None = None,
        peer: str = "203.0.113.9") -> tuple[DummyRequest, bytes]:
    request = DummyRequest([])
    request.method = method
    request.path = path  # type: ignore[assignment]
    request.client = IPv4Address("TCP", peer, 4711)
    for name, value in (headers or {b"user-agent": CHROME.encode()}).items():
        request.requestHeaders.addRawHeader(name, value)
    body = res.render(request)
    return request, body


def header(request: DummyRequest, name: bytes) -> bytes | None:
    values = request.responseHeaders.getRawHeaders(name)
    return values[-1] if values else None


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sink = ListSink()
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000.123)
        self.res = make_resource(self.sink, clock=self.clock)

    def test_open_pixel_and_event(self) -> None:
        for action, kind in (("o", "open"), ("i", "initial_open"), ("ao", "amp_open"),
                             ("ai", "amp_initial_open")):
            request, body = hit(self.res, b"/" + token(action))
            self.assertIn(request.responseCode, (None, 200))
            self.assertEqual(body, PIXEL)
            self.assertEqual(header(request, b"content-type"), b"image/gif")
            self.assertEqual(header(request, b"cache-control"), NO_CACHE)
            self.assertEqual(header(request, b"pragma"), b"no-cache")
            self.assertEqual(header(request, b"expires"), b"0")
            self.assertEqual(self.sink.events[-1], TrackEvent(
                kind, MSG, RCPT, 1_700_000_000_123, "203.0.113.9", CHROME, "", ""))

    def test_click_redirects_exactly(self) -> None:
        for action, kind in (("c", "click"), ("ac", "amp_click")):
            request, body = hit(self.res, b"/" + token(action, URL))
            self.assertEqual(request.responseCode, 302)
            self.assertEqual(header(request, b"location"), URL.encode())
            self.assertEqual(header(request, b"cache-control"), b"no-store")
            self.assertEqual(header(request, b"referrer-policy"), b"no-referrer")
            self.assertEqual(body, b"")
            event = self.sink.events[-1]
            self.assertEqual((event.type, event.url, event.flags), (kind, URL, ""))

    def test_non_ascii_url_location_is_a_uri(self) -> None:
        request, _ = hit(self.res, b"/" + token("c", "https://bücher.example/straße?q=café#ä"))
        self.assertEqual(header(request, b"location"),
                         b"https://xn--bcher-kva.example/stra%C3%9Fe?q=caf%C3%A9#%C3%A4")
        # the event keeps the URL as the sender wrote it
        self.assertEqual(self.sink.events[-1].url, "https://bücher.example/straße?q=café#ä")

    def test_honeypot_marks_that_clients_hits_on_the_message(self) -> None:
        """The hidden link is no event (no target), but its client is a bot for that mail."""
        request, _ = hit(self.res, b"/" + token("h"), peer="198.51.100.7")
        self.assertIn(request.responseCode, (None, 200))
        self.assertIsNone(header(request, b"location"))
        self.assertEqual(self.sink.events, [])
        hit(self.res, b"/" + token("c", URL), peer="198.51.100.7")
        hit(self.res, b"/" + token("c", URL), peer="203.0.113.50")  # someone else
        other_message = TokenCodec.from_specs([KEY]).encode(
            "c", "0123456789abcdef9999", RCPT, URL).encode()
        hit(self.res, b"/" + other_message, peer="198.51.100.7")
        self.assertEqual([e.flags for e in self.sink.events], ["h", "", ""])
        self.clock.advance(601)  # the memory lasts ten minutes
        hit(self.res, b"/" + token("c", URL), peer="198.51.100.7")
        self.assertEqual(self.sink.events[-1].flags, "")

    def test_bad_tokens_404(self) -> None:
        good = token("c", URL)
        other = TokenCodec.from_specs([OTHER_KEY]).encode("c", MSG, RCPT, URL).encode()
        for path in (b"/", b"/nope", b"/" + good[:-3], b"/" + good + b"A", b"/" + good + b"/",
                     b"/x/" + good, b"/" + other, b"/" + good.replace(b"A", b"B", 1),
                     b"/%00", b"/\xff\xfe", b"/" + b"A" * 20_000,
                     b"/tracking/click/" + LEGACY.encode(), b"/" + LEGACY.encode()):
            request, body = hit(self.res, path)
            self.assertEqual(request.responseCode, 404, path[:60])
            self.assertIsNone(header(request, b"location"))
            self.assertLess(len(body), 32)
        self.assertEqual(self.sink.events, [])

    def test_head_is_prefetch(self) -> None:
        request, _ = hit(self.res, b"/" + token("c", URL), method=b"HEAD")
        self.assertEqual(request.responseCode, 302)
        self.assertEqual(self.sink.events[-1].flags, "f")

    def test_other_methods_405(self) -> None:
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"BREW"):
            request, _ = hit(self.res, b"/" + token("o"), method=method)
            self.assertEqual(request.responseCode, 405)
            self.assertEqual(header(request, b"allow"), b"GET, HEAD")
        self.assertEqual(self.sink.events, [])

    def test_root_redirect(self) -> None:
        res = make_resource(self.sink, root="https://example.com/home")
        request, _ = hit(res, b"/")
        self.assertEqual((request.responseCode, header(request, b"location")),
                         (302, b"https://example.com/home"))
        request, _ = hit(res, b"/other")
        self.assertEqual(request.responseCode, 404)

    def test_legacy_tokens_when_enabled(self) -> None:
        res = make_resource(self.sink, legacy=True)
        for path in (b"/tracking/click/" + LEGACY.encode(), b"/" + LEGACY.encode(),
                     b"/tracking/click/" + LEGACY.replace("=", "%3D").encode()):
            request, _ = hit(res, path)
            self.assertEqual(request.responseCode, 302, path)
            self.assertEqual(header(request, b"location"), b"https://thetucks.com")
        self.assertEqual(self.sink.events[-1].message_id, "00000deadbeeff00d1337")
        for path in (b"/tracking/other/" + LEGACY.encode(), b"/tracking/click/",
                     b"/tracking/open/garbage"):
            self.assertEqual(hit(res, path)[0].responseCode, 404, path)
        # current tokens keep working with legacy on
        self.assertEqual(hit(res, b"/" + token("c", URL))[0].responseCode, 302)

    def test_client_ip_from_trusted_proxy_only(self) -> None:
        headers = {b"user-agent": CHROME.encode(), b"x-forwarded-for": b"6.6.6.6, 198.51.100.4"}
        hit(self.res, b"/" + token("o"), headers=headers, peer="127.0.0.1")
        hit(self.res, b"/" + token("o"), headers=headers, peer="192.0.2.1")
        self.assertEqual([e.ip for e in self.sink.events], ["198.51.100.4", "192.0.2.1"])

    def test_user_agent_is_bounded(self) -> None:
        hit(self.res, b"/" + token("o"), headers={b"user-agent": b"Mozilla " * 500})
        self.assertEqual(len(self.sink.events[-1].user_agent), 1000)


class BotPolicyTests(SynchronousTestCase):
    agents = {"person": CHROME, "gmail": GMAIL, "crawler": "Googlebot/2.1",
              "scanner": "Mimecast URL scanner"}

    def run_policy(self, policy: str) -> tuple[dict[str, str | None], ListSink]:
        sink = ListSink()
        self.metrics = Metrics()
        res = make_resource(sink, policy=policy, metrics=self.metrics)
        seen: dict[str, str | None] = {}
        for name, agent in self.agents.items():
            before = len(sink.events)
            request, _ = hit(res, b"/" + token("c", URL), headers={b"user-agent": agent.encode()})
            self.assertEqual(request.responseCode, 302)  # everyone gets the redirect
            seen[name] = sink.events[-1].flags if len(sink.events) > before else None
        hit(res, b"/" + token("h"), peer="192.0.2.66")  # a scanner takes the hidden link,
        before = len(sink.events)  # then a link any person could follow
        hit(res, b"/" + token("c", URL), peer="192.0.2.66")
        seen["honeypot"] = sink.events[-1].flags if len(sink.events) > before else None
        return seen, sink

    def test_flag(self) -> None:
        seen, _ = self.run_policy("flag")
        self.assertEqual(seen, {"person": "", "gmail": "p", "crawler": "b", "scanner": "f",
                                "honeypot": "h"})

    def test_keep(self) -> None:
        seen, _ = self.run_policy("keep")
        self.assertEqual(seen, {"person": "", "gmail": "p", "crawler": "", "scanner": "",
                                "honeypot": ""})

    def test_drop(self) -> None:
        seen, sink = self.run_policy("drop")
        self.assertEqual(seen, {"person": "", "gmail": "p", "crawler": None, "scanner": None,
                                "honeypot": None})
        self.assertEqual(sink.drops["bot_policy"], 3)
        # who made the hits is counted whatever the policy records
        exposition = self.metrics.exposition().decode()
        for name in ("person", "proxy", "bot", "prefetch", "honeypot"):
            self.assertIn(f'sparkytwist_tracker_hit_class_total{{class="{name}"}} 1.0',
                          exposition)


class RateLimitTests(SynchronousTestCase):
    def test_flood_still_served_but_not_recorded(self) -> None:
        sink, clock, metrics = ListSink(), task.Clock(), Metrics()
        res = make_resource(sink, clock=clock, rate=1, burst=5, metrics=metrics)
        codes = [hit(res, b"/" + token("c", URL))[0].responseCode for _ in range(20)]
        self.assertEqual(codes, [302] * 20)
        self.assertEqual(len(sink.events), 5)
        self.assertEqual(sink.drops["rate_limit"], 15)
        hit(res, b"/" + token("o"), peer="198.51.100.1")  # another client is recorded
        self.assertEqual(len(sink.events), 6)
        clock.advance(2)
        hit(res, b"/" + token("o"))
        hit(res, b"/" + token("o"))
        hit(res, b"/" + token("o"))
        self.assertEqual(len(sink.events), 8)
        self.assertIn(b'sparkytwist_tracker_hits_total{outcome="served",type="click"} 20.0',
                      metrics.exposition())


_VALID = token("c", "https://evil.example/")


@st.composite
def forged(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["text", "mutate", "truncate", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return _VALID[: draw(st.integers(0, len(_VALID) - 1))]
    i = draw(st.integers(0, len(_VALID) - 1))
    c = draw(st.sampled_from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    return _VALID[:i] + bytes([c]) + _VALID[i + 1:] if _VALID[i] != c else _VALID[:i]


class ForgedTokenTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(forged())
    def test_forged_tokens_never_redirect(self, candidate: bytes) -> None:
        sink = ListSink()
        res = make_resource(sink, legacy=False)
        request, _ = hit(res, b"/" + candidate)
        self.assertEqual(request.responseCode, 404)
        self.assertIsNone(header(request, b"location"))
        self.assertEqual(sink.events, [])


# -- real HTTP over loopback, plain and TLS ------------------------------------------


def self_signed(directory: Path) -> tuple[str, str, bytes]:
    """(key path, cert path, cert PEM) for CN/SAN localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return str(key_path), str(cert_path), pem


class HTTPTests(TestCase):
    def serve(self, description: str, res: TrackerResource, context: Any = None) -> str:
        service = ListeningService("tracker", description, TrackerSite(res), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        assert service.port is not None
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool, contextFactory=context) if context else \
            Agent(reactor, pool=pool)
        self.http = treq.client.HTTPClient(agent)
        return str(service.port.getHost().port)

    async def check_all(self, base: str, sink: ListSink) -> None:
        response = await self.http.get(f"{base}/{token('o').decode()}", allow_redirects=False)
        body = await response.content()
        self.assertEqual((response.code, body), (200, PIXEL))
        h = response.headers
        self.assertEqual(h.getRawHeaders(b"content-type"), [b"image/gif"])
        self.assertEqual(response.length, 43)
        self.assertEqual(h.getRawHeaders(b"cache-control"), [NO_CACHE])
        self.assertEqual(h.getRawHeaders(b"pragma"), [b"no-cache"])
        self.assertEqual(h.getRawHeaders(b"expires"), [b"0"])

        url = "https://example.com/x?a=1&b=%20two&c=ünï#frag"
        response = await self.http.get(f"{base}/{token('c', url).decode()}",
                                       allow_redirects=False)
        await response.content()
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [b"https://example.com/x?a=1&b=%20two&c=%C3%BCn%C3%AF#frag"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(response.headers.getRawHeaders(b"referrer-policy"), [b"no-referrer"])

        response = await self.http.head(f"{base}/{token('o').decode()}")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"image/gif"])
        self.assertEqual(await response.content(), b"")

        response = await self.http.get(f"{base}/{token('o').decode()[:-2]}")
        self.assertEqual((response.code, await response.content()), (404, b"not found\n"))
        response = await self.http.get(f"{base}/")
        self.assertEqual(response.code, 404)
        await response.content()
        response = await self.http.post(f"{base}/{token('o').decode()}", data=b"x")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        await response.content()

        self.assertEqual([(e.type, e.flags, e.ip) for e in sink.events],
                         [("open", "b", "127.0.0.1"), ("click", "b", "127.0.0.1"),
                          ("open", "bf", "127.0.0.1")])  # treq sends no User-Agent

    async def test_plain_http(self) -> None:
        sink = ListSink()
        port = self.serve("tcp:0:interface=127.0.0.1", make_resource(sink, clock=reactor))
        await self.check_all(f"http://127.0.0.1:{port}", sink)

    async def test_tls_with_self_signed_certificate(self) -> None:
        key, cert, pem = self_signed(Path(self.mktemp()))
        sink = ListSink()
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(pem))
        port = self.serve(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
                          make_resource(sink, clock=reactor), policy)
        await self.check_all(f"https://localhost:{port}", sink)

