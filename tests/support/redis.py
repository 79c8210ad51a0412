"""A private redis-server for the test run, and a per-test connection to it.

One server per test process (trial -j runs several processes, each with its
own), on a free loopback port, never 6379; each test starts from an empty
database. Tests that stop Redis on purpose start a server of their own.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor

from sparkytwist.embedded import RedisServer
from sparkytwist.redis import Redis
from tests.support.ports import free_port

_SERVERS: list[RedisServer] = []


def private_server(*, use_tcp: bool = True) -> RedisServer:
    """A new stopped server in a temp dir that is removed at exit."""
    directory = tempfile.mkdtemp(prefix="sparky-redis-")
    server = RedisServer(directory, appendonly=False, use_tcp=use_tcp,
                         port=free_port() if use_tcp else 0)

    def cleanup() -> None:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(cleanup)
    return server


def shared_server() -> RedisServer:
    """The test process's shared server, started on first use."""
    if not _SERVERS:
        server = private_server()
        server.start()
        _SERVERS.append(server)
    return _SERVERS[0]


def connect(test: Any, url: str, timeout: float = 2.0) -> Redis:
    """An open client that the test case closes in its cleanup."""
    redis = Redis(timeout=timeout, clock=reactor, url=url)
    redis.open()
    test.addCleanup(lambda: defer.Deferred.fromCoroutine(redis.close()))
    return redis


async def fresh_redis(test: Any) -> Redis:
    """A client of the shared server with an empty database."""
    redis = connect(test, shared_server().url)
    await redis.execute("FLUSHALL")
    return redis
