"""The embedded redis-server: starts, keeps data with AOF, never clashes, leaves nothing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sparkytwist.embedded import EmbeddedRedisError, RedisServer, find_redis_server


def command(server: RedisServer, *args: str) -> bytes:
    assert server.socket_path is not None
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(server.socket_path))
        s.sendall(" ".join(args).encode() + b"\r\n")
        return s.recv(1024)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"  # a zombie is gone too


class EmbeddedTests(SynchronousTestCase):
    def server(self) -> RedisServer:
        directory = Path("/tmp") / f"sparky-emb-{os.getpid()}-{time.monotonic_ns()}"
        server = RedisServer(directory)
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.addCleanup(server.stop)
        return server

    def test_unix_socket_aof_and_restart(self) -> None:
        server = self.server()
        server.start()
        self.assertTrue(server.url.startswith("unix://"))
        self.assertEqual(command(server, "SET", "k", "v"), b"+OK\r\n")
        server.stop()
        self.assertTrue((server.data_dir / "appendonly.aof").exists())
        server.start()
        self.assertEqual(command(server, "GET", "k"), b"$1\r\nv\r\n")

    def test_second_instance_on_same_dir_is_refused(self) -> None:
        first = self.server()
        first.start()
        second = RedisServer(first.data_dir)
        with self.assertRaises(EmbeddedRedisError) as caught:
            second.start()
        self.assertIn("in use by another sparkytwist", str(caught.exception))
        self.assertEqual(command(first, "PING"), b"+PONG\r\n")

    def test_two_instances_on_two_dirs(self) -> None:
        a, b = self.server(), self.server()
        a.start()
        b.start()
        command(a, "SET", "where", "a")
        self.assertEqual(command(b, "GET", "where"), b"$-1\r\n")

    def test_stop_leaves_no_process(self) -> None:
        server = self.server()
        server.start()
        pid = server.pid
        assert pid is not None
        server.stop()
        self.assertFalse(alive(pid))

    def test_server_ends_with_a_parent_killed_outright(self) -> None:
        """twistd killed with SIGKILL: its redis-server does not live on (Linux)."""
        server = self.server()
        script = (f"from sparkytwist.embedded import RedisServer; import os, signal; "
                  f"s = RedisServer({str(server.data_dir)!r}); s.start(); "
                  f"print(s.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        child = int(out.strip())
        self.addCleanup(lambda: alive(child) and os.kill(child, signal.SIGKILL))
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertFalse(alive(child))
        server.start()  # and the data directory is usable again at once
        self.assertEqual(command(server, "PING"), b"+PONG\r\n")

    def test_left_over_server_is_stopped_at_start(self) -> None:
        """A redis-server still running from an earlier life of this data dir is stopped."""
        server = self.server()
        server.data_dir.mkdir(parents=True)
        pidfile = server.data_dir / "redis.pid"
        stray = subprocess.Popen(
            [find_redis_server(), "--port", "0", "--save", "", "--daemonize", "no",
             "--unixsocket", str(server.data_dir / "stray.sock"), "--pidfile", str(pidfile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: stray.poll() is None and stray.kill())
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertTrue(alive(stray.pid))
        server.start()
        self.assertEqual(stray.wait(10), 0)  # stopped with SIGTERM: a clean shutdown
        self.assertEqual(command(server, "PING"), b"+PONG\r\n")

    def test_long_path_falls_back_to_tcp(self) -> None:
        top = Path(tempfile.mkdtemp(prefix="sparky-long-"))
        self.addCleanup(shutil.rmtree, top, ignore_errors=True)
        server = RedisServer(top / ("x" * 120))
        self.addCleanup(server.stop)
        server.start()
        self.assertTrue(server.url.startswith("redis://127.0.0.1:"))
        self.assertNotIn(":6379/", server.url)

    def test_missing_binary(self) -> None:
        server = RedisServer(self.mktemp(), binary="/nonexistent/redis-server")
        with self.assertRaises(EmbeddedRedisError) as caught:
            server.start()
        self.assertIn("cannot run /nonexistent/redis-server", str(caught.exception))
        server.binary = ""
        server.start()  # the lock was released: a corrected start works
        server.stop()
