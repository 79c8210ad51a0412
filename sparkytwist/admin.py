# -*- test-case-name: tests.test_admin -*-
"""The admin port: ``/metrics`` for Prometheus and ``/healthz`` for load balancers."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from sparkytwist.metrics import Metrics
from sparkytwist.redis import Redis, RedisUnavailable

_log = Logger()


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self._metrics.exposition()


class HealthResource(resource.Resource):
    """200 when Redis answers a PING within its timeout, else 503 with the reason."""

    isLeaf = True

    def __init__(self, redis: Redis) -> None:
        super().__init__()
        self._redis = redis

    def render_GET(self, request: server.Request) -> int:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.Deferred.fromCoroutine(self._check(request, gone))
        d.addErrback(lambda f: _log.failure("health check failed", f))
        return server.NOT_DONE_YET

    async def _check(self, request: server.Request, gone: list[bool]) -> None:
        """Answer after the PING, unless the prober gave up (disconnected) first."""
        try:
            await self._redis.ping()
        except RedisUnavailable as e:
            request.setResponseCode(503)
            body = f"redis: {e}\n".encode()
        except Exception as e:  # a Redis error reply (e.g. LOADING, NOAUTH) is unhealthy too
            request.setResponseCode(503)
            body = f"redis: {e}\n".encode()
        else:
            body = b"ok\n"
        if not gone:
            request.write(body)
            request.finish()


def admin_site(metrics: Metrics, redis: Redis) -> server.Site:
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"healthz", HealthResource(redis))
    site = server.Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
