# -*- test-case-name: tests.test_tap -*-
"""The running service: Redis first, then the parts; stopped in the reverse order.

Parts share one :class:`Context` (settings, reactor, Redis, metrics, keys, token
codec) instead of globals, so a test can build a part with its own reactor,
Redis and registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from sparkytwist.config import Settings
from sparkytwist.metrics import Metrics
from sparkytwist.redis import Redis
from sparkytwist.store import Keys
from sparkytwist.token import TokenCodec

_log = Logger()


@dataclass(frozen=True)
class Context:
    """What every part is built from."""

    settings: Settings
    reactor: Any
    redis: Redis
    metrics: Metrics
    keys: Keys
    codec: TokenCodec
    #: A worker process (sparkytwist.workers): listen on the shared port, spawn nothing.
    worker: bool = False


class RedisConnectionService(Service):
    """Opens the shared connection on start and closes it after the parts stopped."""

    name = "redis"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def startService(self) -> None:
        self.redis.open()
        _log.info("Redis at {address}", address=self.redis.address)
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self.redis.close())


class OrderedService(MultiService):
    """Children start in the order added and stop one by one in reverse order.

    MultiService stops children concurrently; we need the parts to finish (flush
    buffers, ack batches) before the Redis connection closes and the embedded
    server stops. A child failing to start stops those already started, so a busy
    port never leaves a redis-server behind.
    """

    def startService(self) -> None:
        Service.startService(self)
        started: list[IService] = []
        try:
            for child in self:
                child.startService()
                started.append(child)
        except BaseException:
            for child in reversed(started):
                try:
                    child.stopService()
                except Exception:
                    _log.failure("stopping {name} after a failed start", name=child.name)
            Service.stopService(self)
            raise

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {name}", name=child.name)



class StartupError(Exception):
    """A part cannot start (busy port, no redis-server): the operator must act."""


class ProgramService(OrderedService):
    """The root service of a twistd plugin: a StartupError ends the program in one line."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as e:
            raise SystemExit(f"{self.program}: {e}") from None
