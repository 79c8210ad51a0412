# -*- test-case-name: tests.test_accounting_sources -*-
"""Where accounting bytes come from: stdin (PMTA's pipe), a file, or a spawned command.

Each source attaches its producer to the :class:`AccountingReader` so that the
writer's backpressure reaches it: stdin and the command's stdout are transports
(``pauseProducing`` stops reading the pipe, which fills, and the writer on the
other end blocks); a file is read in 64 KB chunks from the reactor, one chunk per
turn, and simply not read while paused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sparkytwist.accounting.reader import AccountingReader
from sparkytwist.accounting.stats import Stats
from sparkytwist.backoff import Backoff
from sparkytwist.ratelog import RateLimitedLog

_log = Logger()

CHUNK = 65536


@implementer(IHalfCloseableProtocol)
class StdinProtocol(Protocol):
    """For ``twisted.internet.stdio.StandardIO``: stdin's bytes to the reader.

    Half-closeable, so the end of stdin is noticed without closing stdout first.
    """

    def __init__(self, reader: AccountingReader, on_eof: Callable[[], None]) -> None:
        self.reader = reader
        self._on_eof = on_eof
        self._ended = False

    def connectionMade(self) -> None:
        self.reader.attach(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)

    def readConnectionLost(self) -> None:
        self._end()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self.reader.detach()
            self.reader.finish()
            self._on_eof()


@implementer(IPushProducer)
class FileReader:
    """Reads a file (or a redirected stdin) in chunks, one per reactor turn."""

    def __init__(
        self,
        f: IO[bytes],
        reader: AccountingReader,
        clock: Any,
        on_eof: Callable[[], None],
        chunk: int = CHUNK,
    ) -> None:
        self._file = f
        self.reader = reader
        self._clock = clock
        self._on_eof = on_eof
        self.chunk = chunk
        self._call: IDelayedCall | None = None
        self._paused = False
        self._done = False
        #: Bytes read so far (for progress lines).
        self.position = 0

    def start(self) -> None:
        self.reader.attach(self)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self._paused and not self._done:
            self._call = self._clock.callLater(0, self._step)

    def _step(self) -> None:
        self._call = None
        if self._paused or self._done:
            return
        data = self._file.read(self.chunk)
        if not data:
            self._done = True
            self.reader.detach()
            self.reader.finish()
            self._on_eof()
            return
        self.position += len(data)
        self.reader.feed(data)
        self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.pauseProducing()
        self._done = True


class CommandProtocol(ProcessProtocol):
    """The command's stdout to the reader, its stderr to the log (rate-limited)."""

    def __init__(
        self,
        reader: AccountingReader,
        stderr_log: RateLimitedLog,
        on_end: Callable[[Failure], None],
    ) -> None:
        self.reader = reader
        self._stderr_log = stderr_log
        self._on_end = on_end

    def connectionMade(self) -> None:
        self.reader.attach(self.transport)  # type: ignore[arg-type]

    def outReceived(self, data: bytes) -> None:
        self.reader.feed(data)

    def errReceived(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").strip()
        if text:
            self._stderr_log.warn("accounting command stderr ({count} chunks since the "
                                  "last report): {text}", text=text[:300])

    def processEnded(self, reason: Failure) -> None:
        self.reader.detach()
        self.reader.finish()
        self._on_end(reason)


def _exit_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exit code {value.exitCode}"
    return "exit code 0"


class CommandService(Service):
    """Runs ``/bin/sh -c command`` and feeds its stdout to the reader; restarts it.

    A command that exits (tail killed, file gone) is started again after a delay
    that doubles up to ``restart_max`` and starts over once a run lasted that long.
    The command runs in a session of its own (``setsid``) so that stopping the
    service stops the whole pipeline the shell started, not only the shell.
    """

    name = "accounting-command"

    def __init__(
        self,
        command: str,
        reader: AccountingReader,
        reactor: Any,
        stats: Stats,
        *,
        restart_first: float = 1.0,
        restart_max: float = 30.0,
        stop_timeout: float = 5.0,
        log_interval: float = 10.0,
    ) -> None:
        self.command = command
        self.reader = reader
        self._reactor = reactor
        self._stats = stats
        self.restart_first = restart_first
        self.restart_max = restart_max
        self.stop_timeout = stop_timeout
        self._stderr_log = RateLimitedLog(_log, reactor, log_interval)
        self._process: Any = None
        self._started_at = 0.0
        self._attempt = 0
        self._restart: IDelayedCall | None = None
        self._ended: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        setsid = shutil.which("setsid")
        argv = ["/bin/sh", "-c", self.command]
        if setsid:
            argv = [setsid, *argv]
        self._ended = defer.Deferred()
        protocol = CommandProtocol(self.reader, self._stderr_log, self._process_ended)
        self._started_at = self._reactor.seconds()
        self._process = self._reactor.spawnProcess(
            protocol, argv[0], argv, env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r"})
        self._process.closeStdin()
        _log.info("accounting: reading the output of {command!r} (pid {pid})",
                  command=self.command, pid=self._process.pid)

    def _process_ended(self, reason: Failure) -> None:
        self._process = None
        ended, self._ended = self._ended, None
        if ended is not None:
            ended.callback(None)
        if not self.running:
            return
        if self._reactor.seconds() - self._started_at >= self.restart_max:
            self._attempt = 0
        delay = Backoff(self.restart_first, self.restart_max).delay(self._attempt)
        self._attempt += 1
        self._stats.restarted()
        _log.warn("accounting: {command!r} ended ({why}); restarting in {delay:.1f}s",
                  command=self.command, why=_exit_text(reason), delay=delay)
        self._restart = self._reactor.callLater(delay, self._spawn)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        return defer.Deferred.fromCoroutine(self._stop_process())

    async def _stop_process(self) -> None:
        process, ended = self._process, self._ended
        if process is None or ended is None:
            return
        self._signal(process, signal.SIGTERM)
        if self.reader.writer.paused:
            # Its stdout is not being read, so its end would never be seen.
            process.loseConnection()

        def kill() -> None:
            self._signal(process, signal.SIGKILL)
            process.loseConnection()

        timeout = self._reactor.callLater(self.stop_timeout, kill)
        try:
            await ended
        finally:
            if timeout.active():
                timeout.cancel()

    @staticmethod
    def _signal(process: Any, signum: int) -> None:
        pid = process.pid
        if pid is None:
            return
        try:
            os.killpg(pid, signum)  # the session setsid started: the whole pipeline
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(error.ProcessExitedAlready):
                process.signalProcess(signum)
