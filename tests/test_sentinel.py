"""Redis through Sentinel: the master is discovered and used (real redis-server --sentinel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from sparkytwist.embedded import find_redis_server
from sparkytwist.redis import Redis
from tests.support.ports import free_port, wait_for_port
from tests.support.redis import private_server


class SentinelTests(TestCase):
    timeout = 60

    def start_sentinel(self, master_port: int) -> int:
        directory = tempfile.mkdtemp(prefix="sparky-sentinel-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        port = free_port()
        conf = os.path.join(directory, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n")
        process = subprocess.Popen([find_redis_server(), conf, "--sentinel"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop() -> None:
            process.terminate()
            process.wait(10)

        self.addCleanup(stop)
        wait_for_port(port, 10)
        return port

    async def test_master_discovered_through_sentinel(self) -> None:
        master = private_server()
        master.start()
        self.addCleanup(master.stop)
        sentinel_port = self.start_sentinel(master.port)
        redis = Redis(timeout=5, clock=reactor, sentinels=(f"127.0.0.1:{sentinel_port}",),
                      master="mymaster")
        redis.open()
        self.addCleanup(redis.close)
        await redis.execute("SET", "via", "sentinel")
        self.assertEqual(await redis.execute("GET", "via"), b"sentinel")
        self.assertIn("sentinel master 'mymaster'", redis.address)
