# -*- test-case-name: tests.test_fake_ingest -*-
"""The fake Ingest server rejects what SparkPost would, over real HTTP on loopback."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

from sparkytwist.events import (
    INGEST_MAX_BYTES,
    INGEST_PATH,
    UserAgentInfo,
    encode_batch,
    ndjson_line,
    sparkpost_event,
)
from sparkytwist.trackevent import TrackEvent
from tests.support.fake_ingest import (
    IngestViolationError,
    IngestWaitTimeoutError,
    ScriptedResponse,
    listen_fake_ingest,
)

KEY = "0123456789abcdef-ingest"
UA = UserAgentInfo("Chrome", "Windows", "Other", is_mobile=False)
WAIT = 5.0


def _lines(n: int, *, ms: int | None = None, first_seq: int = 0) -> list[bytes]:
    ms = int(time.time() * 1000) if ms is None else ms
    out = []
    for seq in range(first_seq, first_seq + n):
        hit = TrackEvent(
            "click" if seq % 2 else "open",
            "65f0a1b2c3d4e5f6a7b8",
            f"user{seq}@example.com",
            ms,
            "203.0.113.7",
            "Mozilla/5.0",
            url="https://example.com/ü" if seq % 2 else "",
        )
        ev = sparkpost_event(f"{ms}-{seq}".encode(), hit, ua=UA, geo=None, enrichment=None)
        out.append(ndjson_line(ev))
    return out


class FakeIngestTests(TestCase):
    def setUp(self) -> None:
        self.port, self.fake = listen_fake_ingest(reactor, api_key=KEY, testcase=self)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def _post(
        self,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        path: str = INGEST_PATH,
        method: str = "POST",
    ) -> Deferred[Any]:
        sent = {
            "Authorization": KEY,
            "Content-Type": "application/x-ndjson",
            "Content-Encoding": "gzip",
        }
        sent.update(headers or {})
        return self.http.request(
            method,
            self.fake.url + path,
            data=body,
            headers={k: [v] for k, v in sent.items() if v},
        )

    async def _answer(self, d: Deferred[Any]) -> tuple[int, dict[str, Any]]:
        response = await d
        body = await response.content()
        return response.code, json.loads(body) if body else {}

    def _expect_violation(self, containing: str) -> None:
        """The fake recorded exactly one violation; clear it so cleanup passes."""
        self.assertEqual(len(self.fake.violations), 1, self.fake.violations)
        self.assertIn(containing, self.fake.violations[0])
        self.fake.violations.clear()

    async def test_good_batch_accepted(self) -> None:
        lines = _lines(4)
        code, body = await self._answer(self._post(encode_batch(lines)))
        self.assertEqual(code, 200)
        batch_id = body["results"]["id"]
        self.assertEqual(str(uuid.UUID(batch_id)), batch_id)
        events = await self.fake.wait_for_events(4, WAIT)
        self.assertEqual(events, [json.loads(line)["msys"]["track_event"] for line in lines])
        self.assertEqual([b.id for b in self.fake.batches], [batch_id])
        self.assertEqual(self.fake.batches[0].raw_size, len(b"".join(lines)))
        self.assertEqual(events[1]["target_link_url"], "https://example.com/ü")

    async def test_wrong_or_missing_key(self) -> None:
        for key in ("not-the-key", ""):
            code, body = await self._answer(
                self._post(encode_batch(_lines(1)), headers={"Authorization": key})
            )
            self.assertEqual(code, 401)
            self.assertIn("Authorization", body["errors"][0]["message"])
            self.assertEqual(len(self.fake.violations), 1)
            self.fake.violations.clear()
        self.assertEqual(self.fake.events, [])

    async def test_violation_fails_waiters_at_once(self) -> None:
        waiting = self.fake.wait_for_events(1, WAIT)
        await self._answer(self._post(encode_batch(_lines(1)), headers={"Authorization": "x"}))
        with self.assertRaises(IngestViolationError):
            await waiting
        with self.assertRaises(IngestViolationError):
            self.fake.assert_clean()
        self.fake.violations.clear()

    async def test_not_gzip(self) -> None:
        code, body = await self._answer(self._post(b"".join(_lines(2))))
        self.assertEqual(code, 400)
        self.assertIn("not gzip", body["errors"][0]["message"])
        self._expect_violation("not gzip")

    async def test_wrong_content_headers(self) -> None:
        for headers, reason in (
            ({"Content-Type": "application/json"}, "Content-Type"),
            ({"Content-Encoding": ""}, "Content-Encoding"),
            ({"Content-Encoding": "deflate"}, "Content-Encoding"),
        ):
            code, _ = await self._answer(self._post(encode_batch(_lines(1)), headers=headers))
            self.assertEqual(code, 400, headers)
            self._expect_violation(reason)

    async def test_wrong_method_and_path(self) -> None:
        code, _ = await self._answer(self._post(b"", method="GET"))
        self.assertEqual(code, 405)
        self._expect_violation("method GET")
        code, _ = await self._answer(self._post(encode_batch(_lines(1)), path="/api/v1/events"))
        self.assertEqual(code, 404)
        self._expect_violation("path")

    async def test_body_over_the_limit(self) -> None:
        code, _ = await self._answer(self._post(b"\x1f\x8b" + bytes(INGEST_MAX_BYTES)))
        self.assertEqual(code, 413)
        self._expect_violation("limit")

    async def test_bad_lines_reject_the_batch(self) -> None:
        now = int(time.time())
        good = json.loads(_lines(1)[0])
        te = good["msys"]["track_event"]
        bad_events = {
            "event_id": {**te, "event_id": str(1 << 63)},
            "missing rcpt_to": {k: v for k, v in te.items() if k != "rcpt_to"},
            "24 h old": {**te, "timestamp": str(now - 25 * 3600)},
            "unknown field": {**te, "target_url": "https://example.com"},
            "not a track event type": {**te, "type": "delivery"},
            "must be a boolean": {
                **te,
                "user_agent_parsed": {**te["user_agent_parsed"], "is_proxy": "no"},
            },
            "subaccount_id": {**te, "subaccount_id": "7"},
            "geo_ip.latitude": {**te, "geo_ip": {"country": "US", "latitude": "39.1"}},
        }
        for reason, ev in bad_events.items():
            with self.subTest(reason=reason):
                bad_line = json.dumps({"msys": {"track_event": ev}}).encode() + b"\n"
                batch = encode_batch([*_lines(2, first_seq=10), bad_line])
                code, body = await self._answer(self._post(batch))
                self.assertEqual(code, 400)
                self.assertIn("line 3", body["errors"][0]["description"])
                self._expect_violation(reason)
        self.assertEqual(self.fake.events, [])

    async def test_malformed_ndjson(self) -> None:
        line = _lines(1)[0]
        for raw, reason in (
            (b"", "empty batch"),
            (line.rstrip(b"\n"), "newline-terminated"),
            (line + b"\n" + line, "not UTF-8 JSON"),
            (b'{"msys":{"message_event":{}}}\n', "exactly track_event"),
            (line + line, "repeated in batch"),
        ):
            code, _ = await self._answer(self._post(gzip.compress(raw)))
            self.assertEqual(code, 400, reason)
            self._expect_violation(reason)

    async def test_scripted_failures_then_success(self) -> None:
        """500 and 429 are answered in order and store nothing; then 200."""
        self.fake.enqueue(500)
        self.fake.enqueue(429, {"Retry-After": "1"})
        batch = encode_batch(_lines(3))
        response = await self._post(batch)
        self.assertEqual(response.code, 500)
        await response.content()
        response = await self._post(batch)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["1"])
        await response.content()
        self.assertEqual(self.fake.events, [])
        code, _ = await self._answer(self._post(batch))
        self.assertEqual(code, 200)
        await self.fake.wait_for_events(3, WAIT)
        requests = await self.fake.wait_for_requests(3, WAIT)
        self.assertEqual([r.status for r in requests], [500, 429, 200])
        self.assertEqual(len(self.fake.batches), 1)

    async def test_scripted_401_body(self) -> None:
        self.fake.enqueue(401, body=b'{"errors":[{"message":"Unauthorized."}]}')
        code, body = await self._answer(self._post(encode_batch(_lines(1))))
        self.assertEqual(code, 401)
        self.assertEqual(body["errors"][0]["message"], "Unauthorized.")
        self.assertEqual(self.fake.violations, [])

    async def test_hold_keeps_request_pending(self) -> None:
        hold = self.fake.hold_next()
        answer = self._answer(self._post(encode_batch(_lines(2))))
        d = Deferred.fromCoroutine(answer)
        await hold.arrived
        self.assertFalse(d.called)
        self.assertEqual(self.fake.events, [])
        hold.release()
        code, _ = await d
        self.assertEqual(code, 200)
        self.assertEqual(len(self.fake.events), 2)

    async def test_hold_released_with_a_response(self) -> None:
        hold = self.fake.hold_next()
        d = Deferred.fromCoroutine(self._answer(self._post(encode_batch(_lines(1)))))
        await hold.arrived
        hold.release(ScriptedResponse(503, {"Retry-After": "2"}, b""))
        code, _ = await d
        self.assertEqual(code, 503)
        self.assertEqual(self.fake.events, [])

    async def test_wait_times_out(self) -> None:
        with self.assertRaises(IngestWaitTimeoutError) as caught:
            await self.fake.wait_for_events(1, 0.05)
        self.assertIn("1 events", str(caught.exception))

    async def test_client_gives_up_on_held_request(self) -> None:
        """A client timeout while held (connection dropped) is not an error."""
        hold = self.fake.hold_next()
        d = self._post(encode_batch(_lines(1)))
        await hold.arrived
        d.cancel()
        with self.assertRaises(ResponseNeverReceived):
            await d
        await hold.gone
        hold.release()
        self.assertEqual(self.fake.events, [])

    async def test_unreleased_hold_is_cleaned_up(self) -> None:
        """Forgetting to release a hold does not leave the reactor dirty."""
        hold = self.fake.hold_next()
        self._post(encode_batch(_lines(1))).addErrback(lambda _: None)
        await hold.arrived

    async def test_hold_released_before_the_request_arrives(self) -> None:
        hold = self.fake.hold_next()
        hold.release(ScriptedResponse(500))
        code, _ = await self._answer(self._post(encode_batch(_lines(1))))
        self.assertEqual(code, 500)
        self.assertTrue(hold.arrived.called)
