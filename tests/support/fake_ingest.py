# -*- test-case-name: tests.test_fake_ingest -*-
"""An in-process fake of SparkPost's Ingest API, strict about what we send.

It checks every request the way we promise SparkPost we send them (method,
path, Authorization, Content-Type, Content-Encoding, size, gzip, and each
NDJSON line against the ``track_event`` schema in docs/events.md). A bad
request gets a 4xx with the reason, like the real service, and is also
recorded in ``violations``: ``wait_*`` fail at once and ``assert_clean`` (run
at cleanup when a test case is passed to :func:`listen_fake_ingest`) fails the
test, so a client bug cannot hide behind its own retry/dead-letter logic.

Tests script the server side: ``enqueue(status, headers, body)`` answers the
next valid requests (500 then 200, 429 with Retry-After, 401...), and
``hold_next()`` keeps a request pending until the test releases it.
"""

from __future__ import annotations

import gzip
import json
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from sparkytwist.events import (
    CLICK_TYPES,
    INGEST_CONTENT_TYPE,
    INGEST_MAX_AGE_SECONDS,
    INGEST_MAX_BYTES,
    INGEST_PATH,
)
from sparkytwist.trackevent import EVENT_TYPES

#: Decompressed bytes we are willing to inflate (gzip-bomb guard for the fake).
MAX_INFLATED = 200 * 1000 * 1000
#: Clock skew tolerated for event timestamps in the future.
FUTURE_SKEW_SECONDS = 3600

_STR_FIELDS = (
    "type",
    "delv_method",
    "event_id",
    "message_id",
    "rcpt_to",
    "raw_rcpt_to",
    "timestamp",
    "ip_address",
    "user_agent",
    "target_link_url",
    "target_link_name",
    "campaign_id",
    "friendly_from",
    "sending_ip",
    "ip_pool",
    "routing_domain",
)
#: Every line must have these; all other known keys are optional.
REQUIRED = ("type", "delv_method", "event_id", "message_id", "rcpt_to", "timestamp")
KNOWN = frozenset((*_STR_FIELDS, "subaccount_id", "user_agent_parsed", "geo_ip"))
_UA_STR = ("agent_family", "os_family", "device_family")
_UA_BOOL = ("is_mobile", "is_proxy", "is_prefetched")
_GEO_TYPES: dict[str, tuple[type, ...]] = {
    "country": (str,),
    "region": (str,),
    "city": (str,),
    "latitude": (int, float),
    "longitude": (int, float),
    "zip": (int,),
    "postal_code": (str,),
}


class IngestViolationError(AssertionError):
    """The client sent something SparkPost would reject or silently drop."""


class IngestWaitTimeoutError(AssertionError):
    """A ``wait_*`` helper ran out of time."""


@dataclass(frozen=True)
class ScriptedResponse:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class ReceivedRequest:
    """Every request the fake saw, valid or not, and what it answered."""

    number: int
    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    status: int = 0


@dataclass
class IngestBatch:
    """One accepted batch: the id we answered and its decoded lines."""

    id: str
    lines: list[dict[str, Any]]
    compressed_size: int
    raw_size: int

    @property
    def events(self) -> list[dict[str, Any]]:
        return [line["msys"]["track_event"] for line in self.lines]


class HeldRequest:
    """A request kept pending: ``arrived`` fires when one is caught, ``gone`` if the
    client drops the connection meanwhile, and ``release`` answers it (normally, or
    with the given response). Released after the client left, nothing is stored;
    released before the drop is noticed, the batch is accepted (as a real server
    might: the client then retries a batch that already arrived)."""

    def __init__(self) -> None:
        self.arrived: Deferred[None] = Deferred()
        self.gone: Deferred[None] = Deferred()
        self.disconnected = False
        self._answer: Callable[[ScriptedResponse | None], None] | None = None
        self._released = False
        self._response: ScriptedResponse | None = None

    def _catch(self, answer: Callable[[ScriptedResponse | None], None]) -> None:
        self._answer = answer
        released_early = self._released
        self.arrived.callback(None)  # may run a test that releases us right here
        if released_early:
            answer(self._response)

    def release(self, response: ScriptedResponse | None = None) -> None:
        if self._released:
            return
        self._released = True
        self._response = response
        if self._answer is not None and not self.disconnected:
            self._answer(response)


def _error_body(message: str, description: str = "") -> bytes:
    error = {"message": message, **({"description": description} if description else {})}
    return json.dumps({"errors": [error]}).encode()


class FakeIngest(Resource):
    """The resource; see the module docstring. Serve it with :func:`listen_fake_ingest`."""

    isLeaf = True

    def __init__(self, clock: IReactorTime, api_key: str = "test-ingest-key") -> None:
        super().__init__()
        self.clock = clock
        self.api_key = api_key
        self.url = ""
        self.requests: list[ReceivedRequest] = []
        self.batches: list[IngestBatch] = []
        self.events: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self._script: deque[ScriptedResponse] = deque()
        self._holds: deque[HeldRequest] = deque()
        self._pending: list[HeldRequest] = []
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    # --- scripting ---------------------------------------------------------------

    def enqueue(
        self, status: int, headers: Mapping[str, str] | None = None, body: bytes | None = None
    ) -> None:
        """Answer the next valid request with this instead of accepting it."""
        if body is None:
            body = b"" if status < 400 else _error_body(f"scripted {status}")
        self._script.append(ScriptedResponse(status, dict(headers or {}), body))

    def hold_next(self) -> HeldRequest:
        """Keep the next request pending until ``release()`` (or cleanup)."""
        hold = HeldRequest()
        self._holds.append(hold)
        return hold

    def release_all(self) -> None:
        while self._holds:
            self._holds.popleft()  # not caught yet: nothing to answer
        pending, self._pending = self._pending, []
        for hold in pending:
            hold.release()

    # --- waiting -----------------------------------------------------------------

    def wait_for_events(self, n: int, timeout: float) -> Deferred[list[dict[str, Any]]]:
        """Fires with the accepted events once there are at least ``n``."""
        d = self._wait(lambda: len(self.events) >= n, timeout, f"{n} events")
        return d.addCallback(lambda _: list(self.events))

    def wait_for_requests(self, n: int, timeout: float) -> Deferred[list[ReceivedRequest]]:
        """Fires once ``n`` requests were answered (accepted, scripted or rejected)."""

        def answered() -> bool:
            return sum(1 for r in self.requests if r.status) >= n

        d = self._wait(answered, timeout, f"{n} answered requests")
        return d.addCallback(lambda _: list(self.requests))

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> Deferred[None]:
        if self.violations:
            return self._violation_failure()
        if ready():
            return succeed(None)
        d: Deferred[None] = Deferred()
        entry = (ready, d)
        self._waiters.append(entry)

        def expire() -> None:
            self._waiters.remove(entry)
            d.errback(
                IngestWaitTimeoutError(
                    f"waited {timeout}s for {what}; have {len(self.events)} events in "
                    f"{len(self.batches)} batches from {len(self.requests)} requests"
                )
            )

        call: IDelayedCall = self.clock.callLater(timeout, expire)

        def cancel_timer(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        d.addBoth(cancel_timer)
        return d

    def _violation_failure(self) -> Deferred[None]:
        return fail(IngestViolationError("; ".join(self.violations)))

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for ready, d in waiters:
            if self.violations:
                d.errback(IngestViolationError("; ".join(self.violations)))
            elif ready():
                d.callback(None)
            else:
                self._waiters.append((ready, d))

    def assert_clean(self) -> None:
        """Raise if any request broke the contract."""
        if self.violations:
            raise IngestViolationError(
                f"{len(self.violations)} Ingest contract violation(s): "
                + "; ".join(self.violations)
            )

    # --- serving -----------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        received = ReceivedRequest(
            number=len(self.requests) + 1,
            method=(request.method or b"").decode("latin-1"),
            path=(request.path or b"").decode("latin-1"),
            headers={
                k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            body=request.content.read() if request.content is not None else b"",
        )
        self.requests.append(received)
        if self._holds:
            hold = self._holds.popleft()
            self._pending.append(hold)

            def lost(_: object) -> None:
                hold.disconnected = True
                hold.gone.callback(None)

            request.notifyFinish().addErrback(lost)

            def answer(response: ScriptedResponse | None) -> None:
                if hold in self._pending:
                    self._pending.remove(hold)
                body = self._respond(request, received, response)
                request.write(body)
                request.finish()
                self._notify()

            hold._catch(answer)
            return NOT_DONE_YET
        body = self._respond(request, received, None)
        self.clock.callLater(0, self._notify)  # after the response is on its way
        return body

    def _respond(
        self, request: Request, received: ReceivedRequest, forced: ScriptedResponse | None
    ) -> bytes:
        problem = self._check_request(received)
        if problem is not None:
            status, reason = problem
            self.violations.append(f"request {received.number}: {reason}")
            return self._answer(request, received, status, {}, _error_body(reason))
        lines, problems, raw_size = self._parse_body(received.body)
        if problems:
            reason = "; ".join(problems[:20])
            self.violations.append(f"request {received.number}: {reason}")
            return self._answer(request, received, 400, {}, _error_body(problems[0], reason))
        if forced is None and self._script:
            forced = self._script.popleft()
        if forced is not None:
            return self._answer(request, received, forced.status, forced.headers, forced.body)
        batch = IngestBatch(
            id=str(uuid.uuid4()),
            lines=lines,
            compressed_size=len(received.body),
            raw_size=raw_size,
        )
        self.batches.append(batch)
        self.events.extend(batch.events)
        body = json.dumps({"results": {"id": batch.id}}).encode()
        return self._answer(request, received, 200, {}, body)

    @staticmethod
    def _answer(
        request: Request,
        received: ReceivedRequest,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> bytes:
        received.status = status
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return body

    def _check_request(self, r: ReceivedRequest) -> tuple[int, str] | None:
        if r.method != "POST":
            return 405, f"method {r.method} (want POST)"
        if r.path != INGEST_PATH:
            return 404, f"path {r.path!r} (want {INGEST_PATH})"
        auth = r.headers.get("authorization", [])
        if auth != [self.api_key]:
            shown = "missing" if not auth else "wrong"
            return 401, f"Authorization header {shown}"
        ctype = [v.split(";")[0].strip().lower() for v in r.headers.get("content-type", [])]
        if ctype != [INGEST_CONTENT_TYPE]:
            return 400, f"Content-Type {r.headers.get('content-type')} (want {INGEST_CONTENT_TYPE})"
        encoding = [v.strip().lower() for v in r.headers.get("content-encoding", [])]
        if encoding != ["gzip"]:
            return 400, f"Content-Encoding {r.headers.get('content-encoding')} (want gzip)"
        if len(r.body) > INGEST_MAX_BYTES:
            return 413, f"body of {len(r.body)} bytes (limit {INGEST_MAX_BYTES})"
        return None

    def _parse_body(self, body: bytes) -> tuple[list[dict[str, Any]], list[str], int]:
        raw = b""
        try:
            raw = self._gunzip(body)
        except ValueError as e:
            return [], [str(e)], 0
        lines, problems = self._parse_lines(raw)
        return lines, problems, len(raw)

    @staticmethod
    def _gunzip(body: bytes) -> bytes:
        if body[:2] != b"\x1f\x8b":
            raise ValueError("body is not gzip")
        try:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw = inflater.decompress(body, MAX_INFLATED)
            # A stream of several gzip members is still gzip: inflate the rest.
            if inflater.unconsumed_tail:
                raise ValueError("body inflates beyond the fake's limit")
            if not inflater.eof:
                raise ValueError("gzip body is truncated")
            if inflater.unused_data:
                raw += gzip.decompress(inflater.unused_data)
        except (zlib.error, OSError, EOFError) as e:
            raise ValueError(f"body is not valid gzip: {e}") from None
        return raw

    def _parse_lines(self, raw: bytes) -> tuple[list[dict[str, Any]], list[str]]:
        if not raw:
            return [], ["empty batch"]
        if not raw.endswith(b"\n"):
            return [], ["last NDJSON line is not newline-terminated"]
        lines: list[dict[str, Any]] = []
        problems: list[str] = []
        seen_ids: set[str] = set()
        now = self.clock.seconds()
        for number, chunk in enumerate(raw[:-1].split(b"\n"), 1):
            try:
                line = json.loads(chunk.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                problems.append(f"line {number}: not UTF-8 JSON ({e})")
                continue
            problems.extend(f"line {number}: {p}" for p in validate_line(line, now))
            if not problems and isinstance(line, dict):
                event_id = line["msys"]["track_event"]["event_id"]
                if event_id in seen_ids:
                    problems.append(f"line {number}: event_id {event_id} repeated in batch")
                seen_ids.add(event_id)
                lines.append(line)
        return lines, problems


def validate_line(line: object, now: float) -> list[str]:
    """What is wrong with one decoded NDJSON line (empty list: nothing)."""
    if not isinstance(line, dict) or set(line) != {"msys"}:
        return ['not a {"msys": {...}} object']
    msys = line["msys"]
    if not isinstance(msys, dict) or set(msys) != {"track_event"}:
        has = sorted(msys) if isinstance(msys, dict) else msys
        return [f"msys must hold exactly track_event, has {has!r}"]
    ev = msys["track_event"]
    if not isinstance(ev, dict):
        return ["track_event is not an object"]
    problems = [f"missing {key}" for key in REQUIRED if key not in ev]
    problems += [f"unknown field {key!r}" for key in sorted(set(ev) - KNOWN)]
    for key in _STR_FIELDS:
        if key in ev and not isinstance(ev[key], str):
            problems.append(f"{key} must be a string, is {ev[key]!r}")
    if problems:
        return problems
    if ev["type"] not in EVENT_TYPES:
        problems.append(f"type {ev['type']!r} not a track event type")
    if ev["delv_method"] != "esmtp":
        problems.append(f"delv_method {ev['delv_method']!r}")
    event_id = ev["event_id"]
    if not (event_id.isascii() and event_id.isdigit()) or int(event_id) >= 1 << 63:
        problems.append(f"event_id {event_id!r} is not a decimal < 2**63")
    ts = ev["timestamp"]
    if not (ts.isascii() and ts.isdigit()):
        problems.append(f"timestamp {ts!r} is not unix seconds")
    elif int(ts) < now - INGEST_MAX_AGE_SECONDS:
        problems.append(f"timestamp {ts} is more than 24 h old")
    elif int(ts) > now + FUTURE_SKEW_SECONDS:
        problems.append(f"timestamp {ts} is in the future")
    if not ev["message_id"]:
        problems.append("message_id is empty")
    if "@" not in ev["rcpt_to"] or ev["rcpt_to"] != ev["rcpt_to"].lower():
        problems.append(f"rcpt_to {ev['rcpt_to']!r} is not a lowercased address")
    if "raw_rcpt_to" in ev and ev["raw_rcpt_to"].lower() != ev["rcpt_to"]:
        problems.append("raw_rcpt_to and rcpt_to name different recipients")
    if ev["type"] in CLICK_TYPES and not ev.get("target_link_url"):
        problems.append(f"{ev['type']} without target_link_url")
    if ev["type"] not in CLICK_TYPES and "target_link_url" in ev:
        problems.append(f"{ev['type']} with a target_link_url")
    sub = ev.get("subaccount_id")
    if "subaccount_id" in ev and (type(sub) is not int or sub < 0):
        problems.append(f"subaccount_id must be a non-negative integer, is {sub!r}")
    if "user_agent_parsed" in ev:
        problems += _validate_ua(ev["user_agent_parsed"])
    if "geo_ip" in ev:
        problems += _validate_geo(ev["geo_ip"])
    return problems


def _validate_ua(ua: object) -> list[str]:
    if not isinstance(ua, dict):
        return ["user_agent_parsed is not an object"]
    problems = [f"user_agent_parsed: unknown {k!r}" for k in set(ua) - {*_UA_STR, *_UA_BOOL}]
    problems += [
        f"user_agent_parsed.{k} must be a string"
        for k in _UA_STR
        if k in ua and not isinstance(ua[k], str)
    ]
    problems += [
        f"user_agent_parsed.{k} must be a boolean"
        for k in _UA_BOOL
        if k in ua and not isinstance(ua[k], bool)
    ]
    return problems


def _validate_geo(geo: object) -> list[str]:
    if not isinstance(geo, dict) or not geo:
        return ["geo_ip must be a non-empty object (leave it out when unknown)"]
    problems = [f"geo_ip: unknown {k!r}" for k in set(geo) - set(_GEO_TYPES)]
    for key, types in _GEO_TYPES.items():
        value = geo.get(key)
        if key in geo and (isinstance(value, bool) or not isinstance(value, types)):
            problems.append(f"geo_ip.{key} has the wrong type: {value!r}")
    return problems


def listen_fake_ingest(
    reactor: IReactorTCP,
    *,
    api_key: str = "test-ingest-key",
    testcase: SynchronousTestCase | None = None,
) -> tuple[IListeningPort, FakeIngest]:
    """Serve a FakeIngest on 127.0.0.1, a free port; ``fake.url`` is its base URL.

    With ``testcase``, cleanup is registered: pending holds are released, the port
    closed, and ``assert_clean`` run (a contract violation fails the test).
    """
    fake = FakeIngest(IReactorTime(reactor), api_key)
    site = Site(fake)
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    fake.url = f"http://127.0.0.1:{address.port}"
    if testcase is not None:
        testcase.addCleanup(fake.assert_clean)
        testcase.addCleanup(port.stopListening)
        testcase.addCleanup(fake.release_all)
    return port, fake


__all__ = [
    "FakeIngest",
    "HeldRequest",
    "IngestBatch",
    "IngestViolationError",
    "IngestWaitTimeoutError",
    "ReceivedRequest",
    "ScriptedResponse",
    "listen_fake_ingest",
    "validate_line",
]
