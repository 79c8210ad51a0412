# -*- test-case-name: tests.test_feeder -*-
"""The feeder part: settings -> a sink, a stream consumer and the Feeder loop.

The loop itself (batches, retries, acknowledgements) is :mod:`sparkytwist.feeder.pipeline`.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Sequence
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet import defer

from sparkytwist.config import Settings
from sparkytwist.events import GeoLookup
from sparkytwist.feeder.consumer import StreamConsumer
from sparkytwist.feeder.pipeline import Feeder
from sparkytwist.feeder.sinks import (
    REQUEST_TIMEOUT,
    FileSink,
    Sink,
    SparkPostSink,
    WebhookSink,
)
from sparkytwist.metrics import Metrics
from sparkytwist.redis import Redis
from sparkytwist.service import Context
from sparkytwist.store import FEEDER_GROUP, Keys


class FeederService(Service):
    """Starts the feeder with the service tree; on stop, closes what it opened."""

    name = "feeder"

    def __init__(self, feeder: Feeder, closers: Sequence[Any] = ()) -> None:
        self.feeder = feeder
        self._closers = list(closers)

    def startService(self) -> None:
        super().startService()
        self.feeder.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.feeder.stop()
        for close in self._closers:
            result = close()
            if isinstance(result, defer.Deferred):
                await result


def consumer_name(settings: Settings) -> str:
    return settings.feeder_name or f"{socket.gethostname()}-{os.getpid()}"


def make_sink(settings: Settings, reactor: Any, http: Any, clock: Any = None,
              timeout: float = REQUEST_TIMEOUT) -> Sink:
    clock = clock if clock is not None else reactor
    if settings.sink == "file":
        return FileSink(settings.sink_dir, reactor)
    if settings.sink == "webhook":
        return WebhookSink(http, settings.webhook_url, settings.webhook_secret, clock,
                           timeout=timeout)
    return SparkPostSink(http, settings.sparkpost_host, settings.sparkpost_api_key, clock,
                         timeout=timeout)


def missing_requirement(settings: Settings) -> str | None:
    """Why the feeder cannot run with these settings, or None."""
    if settings.sink == "sparkpost" and not settings.sparkpost_api_key:
        return ("no SparkPost API key (set sparkpost_api_key or SPARKPOST_API_KEY_INGEST); "
                "events keep accumulating in the stream, up to events_maxlen")
    if settings.sink == "webhook" and not settings.webhook_url:
        return "sink = webhook needs webhook_url"
    return None


def build_feeder(
    settings: Settings,
    *,
    redis: Redis,
    keys: Keys,
    metrics: Metrics,
    reactor: Any,
    clock: Any = None,
    http: Any = None,
    rng: random.Random | None = None,
    **overrides: Any,
) -> FeederService | str:
    """The feeder service for these settings, or the reason it cannot run.

    ``http`` is a treq HTTPClient; without one, a client with its own persistent
    connection pool is made (and its connections closed on stop).
    """
    reason = missing_requirement(settings)
    if reason is not None:
        return reason
    closers: list[Any] = []
    if http is None and settings.sink != "file":
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=True)
        http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=30))
        closers.append(pool.closeCachedConnections)
    try:
        sink = make_sink(settings, reactor, http, clock)
    except ValueError as e:
        return str(e)
    geo = None
    if settings.geoip_database:
        try:
            geo = GeoLookup(settings.geoip_database)
        except Exception as e:  # maxminddb raises its own errors for a bad file
            return f"geoip_database {settings.geoip_database!r}: {e}"
        closers.append(geo.close)
    consumer = StreamConsumer(redis, keys, FEEDER_GROUP, consumer_name(settings))
    feeder = Feeder(
        consumer=consumer, sink=sink, metrics=metrics, reactor=reactor, clock=clock,
        max_bytes=settings.batch_max_bytes, max_age=settings.batch_max_age,
        claim_idle=settings.claim_idle, geo=geo, rng=rng, **overrides)
    return FeederService(feeder, closers)


def make_service(ctx: Context) -> IService | str:
    """The ``feeder`` part of ``twistd sparkytrack`` (registered in tap.PART_FACTORIES)."""
    return build_feeder(ctx.settings, redis=ctx.redis, keys=ctx.keys, metrics=ctx.metrics,
                        reactor=ctx.reactor)
