# -*- test-case-name: tests.test_redis -*-
"""Redis on txredisapi, with a timeout on every call.

txredisapi queues a command until a connection exists, and while Redis is down
that wait never ends; every call here is bounded by ``timeout`` instead, so a part
can notice the outage (buffer, pause, answer 503) rather than hang. Replies are
left as bytes (``charset=None``, no number guessing): callers know their types,
and skipping txredisapi's conversions keeps stream reads fast.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger()

#: The longest pause between reconnection attempts (txredisapi's default is 10 s).
RECONNECT_MAX_DELAY = 3.0


class RedisUnavailable(Exception):
    """Redis did not answer in time, or the connection is down."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: a TCP host/port (optionally TLS) or a unix socket path."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""
    password: str | None = None
    username: str | None = None
    db: int = 0
    tls: bool = False
    #: rediss:// only: check the server's certificate and name (``?ssl_cert_reqs=none``
    #: turns it off), against ``?ssl_ca_certs=/path.pem`` or the system's CAs.
    tls_verify: bool = True
    tls_ca: str = ""

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """``redis://[user:pass@]host[:port][/db]``, ``rediss://...``, ``unix:///path?db=N``."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        query = parse_qs(parts.query)
        if scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// Redis URL needs a socket path")
            db = int(query.get("db", ["0"])[0])
            return cls(path=parts.path, password=password, username=username, db=db)
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {scheme!r}")
        path_db = parts.path.strip("/")
        db = int(path_db or query.get("db", ["0"])[0])
        cert_reqs = query.get("ssl_cert_reqs", ["required"])[0].lower()
        if cert_reqs not in ("required", "none"):
            raise ValueError(f"ssl_cert_reqs must be required or none, not {cert_reqs!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            password=password,
            username=username,
            db=db,
            tls=scheme == "rediss",
            tls_verify=cert_reqs == "required",
            tls_ca=query.get("ssl_ca_certs", [""])[0],
        )

    def tls_options(self) -> Any:
        """How to start TLS for rediss://: verified unless the URL says otherwise."""
        from twisted.internet import ssl

        if not self.tls_verify:
            return ssl.CertificateOptions(verify=False)
        if self.tls_ca:
            with open(self.tls_ca, "rb") as f:
                trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        else:
            trust = ssl.platformTrust()
        return ssl.optionsForClientTLS(self.host, trustRoot=trust)

    def __str__(self) -> str:
        """Where we connect, for logs: never the password."""
        if self.path:
            return f"unix:{self.path}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


class Script:
    """A Lua script run by EVALSHA, loaded with EVAL the first time a server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, redis: Redis, keys: list[bytes | str], args: list[Any]
    ) -> Any:
        try:
            return await redis.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisUnavailable:
            raise
        except Exception as e:
            if "NOSCRIPT" not in str(e):
                raise
        return await redis.execute("EVAL", self.source, len(keys), *keys, *args)


class Redis:
    """A txredisapi connection (opened by :meth:`open`) with a bounded wait on every call.

    Built before it connects, so every part can hold it from the start while the
    service decides when Redis is there to connect to (after an embedded server
    started); calls made before ``open`` fail with RedisUnavailable.
    """

    def __init__(
        self,
        *,
        timeout: float,
        clock: IReactorTime,
        url: str = "",
        sentinels: tuple[str, ...] = (),
        master: str = "mymaster",
        password: str = "",
    ) -> None:
        self.timeout = timeout
        self._clock = clock
        self._url = url
        self._sentinels = sentinels
        self._master = master
        self._password = password
        self._handler: Any = None
        self._sentinel_manager: Any = None
        if sentinels:
            self.address = f"sentinel master {master!r} via {', '.join(sentinels)}"
        else:
            self.address = str(RedisAddress.from_url(url))

    @property
    def url(self) -> str:
        """The URL connected to (with its password): for worker processes, never for logs."""
        return self._url

    @property
    def sentinels(self) -> tuple[str, ...]:
        return self._sentinels

    def open(self) -> None:
        """Connect lazily; txredisapi reconnects by itself after a loss."""
        import txredisapi

        common: dict[str, Any] = {
            "charset": None,
            "convertNumbers": False,
            "connectTimeout": self.timeout,
            "replyTimeout": self.timeout,
        }
        if self._sentinels:
            pairs = [(h, int(p)) for h, _, p in (s.rpartition(":") for s in self._sentinels)]
            self._sentinel_manager = txredisapi.Sentinel(pairs, connectTimeout=self.timeout)
            # master_for takes no connectTimeout: discovery has its own timeout.
            del common["connectTimeout"]
            handler = self._sentinel_manager.master_for(
                self._master, factory_class=_bytes_sentinel_factory(),
                password=self._password or None, **common)
        else:
            address = RedisAddress.from_url(self._url)
            credentials: dict[str, Any] = {"password": address.password,
                                           "dbid": address.db or None}
            if address.username:
                credentials["username"] = address.username
            if address.path:
                handler = txredisapi.lazyUnixConnection(address.path, **credentials, **common)
            else:
                handler = txredisapi.lazyConnection(
                    address.host, address.port,
                    ssl_context_factory=address.tls_options() if address.tls else False,
                    **credentials, **common)
        handler._factory.maxDelay = RECONNECT_MAX_DELAY
        if not self._sentinels:
            handler._factory.protocol = _raw_reply_protocol()
        self._handler = handler

    def execute(self, *args: Any) -> defer.Deferred[Any]:
        """Run one command; RedisUnavailable when no answer comes within the timeout."""
        if self._handler is None:
            return defer.fail(RedisUnavailable("not connected to Redis"))
        try:
            d: defer.Deferred[Any] = self._handler.execute_command(*args)
        except Exception as e:  # txredisapi raises synchronously when a connection died
            return defer.fail(RedisUnavailable(str(e)))
        d.addTimeout(self.timeout, self._clock)
        d.addErrback(self._translate)
        return d

    def _translate(self, failure: Any) -> Any:
        from txredisapi import ConnectionError as TxConnectionError
        from txredisapi import TimeoutError as TxTimeoutError

        if failure.check(defer.TimeoutError, TxTimeoutError, defer.CancelledError):
            raise RedisUnavailable(f"no answer from Redis within {self.timeout:g}s")
        if failure.check(TxConnectionError):
            raise RedisUnavailable(f"Redis connection lost: {failure.value}")
        return failure

    async def ping(self) -> None:
        await self.execute("PING")

    async def close(self) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            await handler.disconnect()
        if self._sentinel_manager is not None:
            await self._sentinel_manager.disconnect()
            self._sentinel_manager = None


def _bytes_sentinel_factory() -> Any:
    """txredisapi's Sentinel factory, made to work with bytes replies.

    Its protocol checks ``ROLE`` against the str ``"master"``; with ``charset=None``
    the reply is ``b"master"``, so every connection was dropped as "not a master".
    """
    import txredisapi

    class BytesRoleProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
        def tryConvertData(self, data: Any) -> Any:
            return data

        def role(self) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = super().role()
            return d.addCallback(
                lambda r: [r[0].decode(), *r[1:]] if r and isinstance(r[0], bytes) else r)

    class BytesSentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
        protocol = BytesRoleProtocol

    return BytesSentinelFactory


def _raw_reply_protocol() -> Any:
    """txredisapi's protocol without its per-element reply conversion.

    With ``charset=None`` and ``convertNumbers=False`` the conversion changes
    nothing, yet it walks every element of every reply in Python (~1 µs each):
    most of the cost of reading a stream. hiredis already gives bytes and ints.
    """
    import txredisapi

    class RawReplyProtocol(txredisapi.RedisProtocol):  # type: ignore[misc]
        def tryConvertData(self, data: Any) -> Any:
            return data

    return RawReplyProtocol
