# -*- test-case-name: tests.test_tracker -*-
"""The tracker's twisted.web resource: the pixel, the redirect, and nothing else.

It never talks to Redis: a valid hit is answered at once and handed to an
:class:`EventSink` (the recorder queues it; the write happens later, in batches).
Everything that is not a token we sealed is a small 404: a forged, truncated or
unknown-key token can never make us redirect, and no input makes a 500.
"""

from __future__ import annotations

import os
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from sparkytwist.metrics import Metrics
from sparkytwist.ratelog import RateLimitedLog
from sparkytwist.token import TokenCodec, TokenError, Tracking, decode_legacy
from sparkytwist.tracker.bots import BotClassifier, HoneypotMemory, apply_policy
from sparkytwist.tracker.clientip import ClientAddress
from sparkytwist.tracker.location import to_uri
from sparkytwist.tracker.ratelimit import PerClientLimiter
from sparkytwist.trackevent import EVENT_TYPES, TrackEvent

_log = Logger()

#: A 1x1 transparent GIF89a: 43 bytes.
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
         b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
NOT_FOUND = b"not found\n"
#: Longest user agent kept in an event (and in the classifier's cache).
MAX_USER_AGENT = 1000
ALLOWED_METHODS = (b"GET", b"HEAD")
_LEGACY_PREFIX = b"/tracking/"


class EventSink(Protocol):
    """Where hits go: the recorder, or a list in tests."""

    def record(self, event: TrackEvent) -> bool: ...

    def dropped(self, reason: str, count: int = 1) -> None: ...


class TrackerResource(resource.Resource):
    """``GET|HEAD /<token>`` (and ``/tracking/open|click/<token>`` for legacy links)."""

    isLeaf = True

    def __init__(self, codec: TokenCodec, sink: EventSink, *, clock: IReactorTime,
                 metrics: Metrics, client_address: ClientAddress, bots: BotClassifier,
                 limiter: PerClientLimiter, bot_events: str = "flag",
                 root_redirect: str = "", worker_header: bool = False) -> None:
        super().__init__()
        self._codec = codec
        self._sink = sink
        self._clock = clock
        self._client_address = client_address
        self._bots = bots
        self._limiter = limiter
        self._bot_events = bot_events
        self._root = to_uri(root_redirect).encode("ascii") if root_redirect else b""
        self._worker = str(os.getpid()).encode() if worker_header else b""
        self._hits = metrics.counter(
            "tracker_hits", "Requests to the tracker by event type and outcome",
            ["type", "outcome"])
        self._hit_children: dict[tuple[str, str], Any] = {}
        for kind in (*EVENT_TYPES, "honeypot"):
            self._hit_children[(kind, "served")] = self._hits.labels(kind, "served")
        for outcome in ("404", "405"):
            self._hit_children[("none", outcome)] = self._hits.labels("none", outcome)
        self._honeypots = HoneypotMemory(clock)
        by_class = metrics.counter(
            "tracker_hit_class", "Opens and clicks by who made them (before bot_events)",
            ["class"])
        self._classes = {c: by_class.labels(c) for c in HIT_CLASSES}
        self._rate_log = RateLimitedLog(_log, clock)
        self._error_log = RateLimitedLog(_log, clock)

    def _count(self, kind: str, outcome: str) -> None:
        child = self._hit_children.get((kind, outcome))
        if child is None:
            child = self._hit_children[(kind, outcome)] = self._hits.labels(kind, outcome)
        child.inc()

    # -- routing ------------------------------------------------------------------

    def _lookup(self, path: bytes) -> Tracking | None:
        """The token in the path, or None for anything that is not ours."""
        try:
            if path.startswith(_LEGACY_PREFIX):
                if not self._codec.accept_legacy:
                    return None
                kind, _, token = path[len(_LEGACY_PREFIX):].partition(b"/")
                if kind not in (b"open", b"click") or not token or b"/" in token:
                    return None
                return decode_legacy(unquote_to_bytes(token).decode("ascii"))
            token = path[1:]
            if not token or b"/" in token:
                return None
            try:
                return self._codec.decode(token.decode("ascii"))
            except (TokenError, UnicodeDecodeError):
                if not self._codec.accept_legacy:
                    return None
                return decode_legacy(unquote_to_bytes(token).decode("ascii"))
        except (TokenError, UnicodeDecodeError):
            return None
        except Exception:
            self._error_log.warn("tracker: unexpected error reading a token ({count}x)")
            return None

    def render(self, request: IRequest) -> bytes:
        if self._worker:
            request.setHeader(b"X-Sparky-Worker", self._worker)
        method = request.method
        if method not in ALLOWED_METHODS:
            self._count("none", "405")
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            return self._small(request, b"method not allowed\n")
        path: bytes = request.path
        tracking = self._lookup(path)
        if tracking is None:
            if path == b"/" and self._root:
                self._count("root", "served")
                request.setResponseCode(302)
                request.setHeader(b"Location", self._root)
                return self._small(request, b"")
            self._count("none", "404")
            request.setResponseCode(404)
            return self._small(request, NOT_FOUND)
        body = self._respond(request, tracking)
        try:
            if tracking.action == "h":
                # Not an event: no SparkPost type fits a link nobody can see. It marks
                # this client's other hits on the message as a bot's instead.
                self._count("honeypot", "served")
                self._honeypots.remember(self._client_ip(request), tracking.message_id)
            else:
                self._count(tracking.event_type, "served")
                self._record(request, tracking, head=method == b"HEAD")
        except Exception:
            self._error_log.warn("tracker: a hit could not be recorded ({count}x)")
        return body

    # -- responses ----------------------------------------------------------------

    @staticmethod
    def _small(request: IRequest, body: bytes) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    @staticmethod
    def _respond(request: IRequest, tracking: Tracking) -> bytes:
        if tracking.url is not None:
            request.setResponseCode(302)
            request.setHeader(b"Location", to_uri(tracking.url).encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Referrer-Policy", b"no-referrer")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b""
        if tracking.is_click:  # the honeypot link has no target: an empty page
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b""
        request.setHeader(b"Content-Type", b"image/gif")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate, max-age=0")
        request.setHeader(b"Pragma", b"no-cache")
        request.setHeader(b"Expires", b"0")
        return PIXEL

    # -- recording ----------------------------------------------------------------

    def _client_ip(self, request: IRequest) -> str:
        peer = getattr(request.getClientAddress(), "host", None)
        if peer is None:  # a unix socket: a proxy on this host
            peer = "127.0.0.1"
        headers = request.requestHeaders
        forwarded = headers.getRawHeaders(b"x-forwarded-for")
        real_ip = headers.getRawHeaders(b"x-real-ip")
        if forwarded is None and real_ip is None:
            return str(peer)
        return self._client_address.resolve(
            str(peer), b",".join(forwarded) if forwarded else None,
            real_ip[-1] if real_ip else None)

    def _record(self, request: IRequest, tracking: Tracking, *, head: bool) -> None:
        raw_agent = request.getHeader(b"user-agent")
        agent = raw_agent[:MAX_USER_AGENT].decode("utf-8", "surrogateescape") \
            if raw_agent else ""
        ip = self._client_ip(request)
        seen = self._bots.flags(agent, head=head,
                                honeypot=self._honeypots.caught(ip, tracking.message_id))
        self._classes[hit_class(seen)].inc()
        flags = apply_policy(seen, self._bot_events)
        if flags is None:
            self._sink.dropped("bot_policy")
            return
        if not self._limiter.allow(ip):
            self._sink.dropped("rate_limit")
            self._rate_log.warn("tracker: per-IP rate limit: {count} hit(s) not recorded "
                                "(the last from {ip})", ip=ip)
            return
        self._sink.record(TrackEvent(
            type=tracking.event_type, message_id=tracking.message_id, rcpt=tracking.rcpt,
            timestamp_ms=int(self._clock.seconds() * 1000), ip=ip, user_agent=agent,
            url=tracking.url or "", flags=flags))


#: Who made a hit, from its flags: the first that applies, in this order.
HIT_CLASSES = ("honeypot", "bot", "prefetch", "proxy", "person")
_CLASS_OF_FLAG = (("h", "honeypot"), ("b", "bot"), ("f", "prefetch"), ("p", "proxy"))


def hit_class(flags: str) -> str:
    for letter, name in _CLASS_OF_FLAG:
        if letter in flags:
            return name
    return "person"


class TrackerSite(server.Site):
    """No access log line per hit (a proxy in front can keep one), no tracebacks."""

    displayTracebacks = False
    noisy = False  # ListeningService says where we listen

    def log(self, request: Any) -> None:
        pass
