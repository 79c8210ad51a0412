"""The admin port over real HTTP: Prometheus text, and health that follows Redis."""

from __future__ import annotations

from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web._newclient import ResponseNeverReceived

from sparkytwist.admin import admin_site
from sparkytwist.metrics import Metrics
from sparkytwist.redis import Redis
from tests.support.http import http_client
from tests.support.redis import fresh_redis


class AdminTests(TestCase):
    async def serve(self, metrics: Metrics, redis: Redis) -> str:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            admin_site(metrics, redis))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def test_metrics_exposition(self) -> None:
        metrics = Metrics()
        metrics.counter("hits", "Tracker hits", ["type"]).labels(type="open").inc(3)
        base = await self.serve(metrics, await fresh_redis(self))
        response = await http_client(self).get(f"{base}/metrics")
        body = await response.text()
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        self.assertIn('sparkytwist_hits_total{type="open"} 3.0', body)

    async def test_healthz_ok(self) -> None:
        base = await self.serve(Metrics(), await fresh_redis(self))
        response = await http_client(self).get(f"{base}/healthz")
        self.assertEqual((response.code, await response.content()), (200, b"ok\n"))

    async def test_healthz_503_with_reason_when_redis_is_down(self) -> None:
        redis = Redis(timeout=0.3, clock=reactor, url="redis://127.0.0.1:1/0")
        redis.open()
        self.addCleanup(redis.close)
        base = await self.serve(Metrics(), redis)
        response = await http_client(self).get(f"{base}/healthz")
        body = await response.text()
        self.assertEqual(response.code, 503)
        self.assertTrue(body.startswith("redis: "), body)

    async def test_unknown_path(self) -> None:
        base = await self.serve(Metrics(), await fresh_redis(self))
        self.assertEqual((await http_client(self).get(f"{base}/nope")).code, 404)

    async def test_prober_giving_up_first_is_no_error(self) -> None:
        """A load balancer that hangs up before Redis answers: nothing breaks, nothing logged."""
        from twisted.internet.protocol import Factory, Protocol

        silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol))  # accepts, never answers: PING times out
        self.addCleanup(silent.stopListening)
        redis = Redis(timeout=0.5, clock=reactor,
                      url=f"redis://127.0.0.1:{silent.getHost().port}/0")
        redis.open()
        self.addCleanup(redis.close)
        base = await self.serve(Metrics(), redis)
        client = http_client(self)
        request = client.get(f"{base}/healthz")
        await task.deferLater(reactor, 0.1, request.cancel)
        with self.assertRaises(ResponseNeverReceived):
            await request
        await task.deferLater(reactor, 1.0, lambda: None)  # past the PING's timeout
        self.assertEqual(self.flushLoggedErrors(), [])
