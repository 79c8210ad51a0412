# -*- test-case-name: tests.test_accounting_service -*-
"""The accounting reader as a part of ``twistd sparkytrack`` and as ``twistd etl``.

Inside sparkytrack it reads the output of ``accounting_command`` (for example
``tail -F -n +1 /var/log/pmta/acct.csv``), restarted when it ends, with metrics on
the admin port. ``twistd -n --pidfile= etl`` reads stdin (PowerMTA's
``<acct-file |...>`` pipe) or ``--file`` once, logs its counts (it has no admin port),
and at the end of its input stops the reactor once every record is written:
exit 0 means nothing read was lost. If Redis stays down at the end, it keeps
retrying until it is stopped (SIGTERM), and then says how many records were lost.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from typing import IO, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, task
from twisted.logger import Logger

from sparkytwist.accounting.reader import AccountingReader
from sparkytwist.accounting.sources import CommandService, FileReader, StdinProtocol
from sparkytwist.accounting.stats import Stats
from sparkytwist.accounting.writer import DeliveryWriter
from sparkytwist.service import Context

_log = Logger()

NO_COMMAND = "no accounting_command; run `twistd -n etl` as PMTA's pipe instead"
#: Seconds between progress lines: back-fill from a file, and the PMTA pipe.
FILE_PROGRESS_INTERVAL = 5.0
PIPE_PROGRESS_INTERVAL = 300.0


def build_reader(ctx: Context, stats: Stats, **writer_options: Any) -> AccountingReader:
    """A reader and its writer for this context's Redis, keys and ``acct_ttl``."""
    writer = DeliveryWriter(ctx.redis, ctx.keys, ttl=ctx.settings.acct_ttl, clock=ctx.reactor,
                            stats=stats, **writer_options)
    return AccountingReader(writer, stats, ctx.reactor)


def stop_timeout(ctx: Context) -> float:
    """How long stopping waits for the last batches to be written."""
    return max(5.0, 2 * ctx.settings.redis_timeout)


async def _drain_then_stop(reader: AccountingReader, timeout: float, clock: Any,
                           program: str) -> None:
    """Write what was read (bounded wait), then give up and say what was lost."""
    writer = reader.writer
    drained = writer.drain()
    if not drained.called:
        _log.info("{program}: writing the last {n} records before stopping",
                  program=program, n=writer.pending)
        drained.addTimeout(timeout, clock)
        with contextlib.suppress(defer.TimeoutError):
            await drained
    lost = writer.stop()
    if lost:
        _log.critical("{program}: stopped with {lost} records read but NOT written to Redis "
                      "(Redis unreachable); they are lost", program=program, lost=lost)


class AccountingService(MultiService):
    """sparkytrack's accounting part: the command, the reader, the writer."""

    name = "accounting"

    def __init__(self, ctx: Context, command: str, **command_options: Any) -> None:
        super().__init__()
        self.ctx = ctx
        self.stats = Stats(ctx.metrics)
        self.reader = build_reader(ctx, self.stats)
        self.command = CommandService(command, self.reader, ctx.reactor, self.stats,
                                      **command_options)
        self.command.setServiceParent(self)

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await defer.maybeDeferred(super().stopService)  # the command ends first
        self.reader.stop_input()
        await _drain_then_stop(self.reader, stop_timeout(self.ctx), self.ctx.reactor,
                               "accounting")
        _log.info("accounting: {summary}", summary=self.stats.summary())


def make_service(ctx: Context) -> IService | str:
    """The accounting part of ``twistd sparkytrack``, or why it can't run."""
    command = ctx.settings.accounting_command.strip()
    if not command:
        return NO_COMMAND
    return AccountingService(ctx, command)


def _is_regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class EtlService(Service):
    """``twistd etl``: stdin (or a file) once through; ``on_done`` when all is written."""

    name = "etl"

    def __init__(
        self,
        ctx: Context,
        *,
        path: str | None = None,
        on_done: Callable[[], None] | None = None,
        stdin_fd: int = 0,
        progress_interval: float | None = None,
    ) -> None:
        self.ctx = ctx
        self.path = path
        self._on_done = on_done
        self._stdin_fd = stdin_fd
        self._progress_interval = progress_interval
        self.stats = Stats()
        self.reader = build_reader(ctx, self.stats)
        self.finished: defer.Deferred[None] = defer.Deferred()
        self._file: IO[bytes] | None = None
        self._file_reader: FileReader | None = None
        self._size = 0
        self._progress: task.LoopingCall | None = None
        self._started_at = 0.0
        self._eof = False
        self._done = False

    def startService(self) -> None:
        super().startService()
        reactor = self.ctx.reactor
        self._started_at = reactor.seconds()
        source = self.path
        if source is None and _is_regular_file(self._stdin_fd):
            source = "stdin"
            self._file = os.fdopen(os.dup(self._stdin_fd), "rb")
        elif source is not None:
            self._file = open(source, "rb")  # noqa: SIM115 (closed at the end)
        if self._file is not None:
            self._size = os.fstat(self._file.fileno()).st_size
            _log.info("etl: loading {source} ({size} bytes)", source=source, size=self._size)
            self._file_reader = FileReader(self._file, self.reader, reactor, self._input_ended)
            self._file_reader.start()
            interval = self._progress_interval or FILE_PROGRESS_INTERVAL
        else:
            from twisted.internet.stdio import StandardIO

            # Our log goes to stdout: give StandardIO /dev/null to write to instead.
            devnull = os.open(os.devnull, os.O_WRONLY)
            stdio: Any = StandardIO
            stdio(StdinProtocol(self.reader, self._input_ended), stdin=self._stdin_fd,
                  stdout=devnull, reactor=reactor)
            _log.info("etl: reading PMTA accounting CSV from stdin")
            interval = self._progress_interval or PIPE_PROGRESS_INTERVAL
        self._progress = task.LoopingCall(self._log_progress)
        self._progress.clock = reactor
        self._progress.start(interval, now=False)

    def _log_progress(self) -> None:
        elapsed = max(1e-9, self.ctx.reactor.seconds() - self._started_at)
        where = ""
        if self._file_reader is not None and self._size:
            where = f", {100 * self._file_reader.position / self._size:.0f}% of the file"
        s = self.stats
        _log.info("etl: progress: {read} records read, {stored} stored, {skipped} skipped, "
                  "{malformed} malformed, {rate:.0f} records/s{where}{paused}",
                  read=s.read, stored=s.stored, skipped=s.skipped, malformed=s.malformed,
                  rate=s.read / elapsed, where=where,
                  paused=" (paused: Redis unavailable)" if self.reader.writer.redis_down
                  else "")

    def _input_ended(self) -> None:
        self._eof = True
        self._close_file()
        writer = self.reader.writer
        if writer.pending:
            _log.info("etl: end of input; writing the last {n} records", n=writer.pending)
        writer.drain().addCallback(lambda _: self._all_written())

    def _all_written(self) -> None:
        if self._done:
            return
        self._done = True
        self._stop_progress()
        elapsed = self.ctx.reactor.seconds() - self._started_at
        _log.info("etl: done in {elapsed:.1f}s: {summary}", elapsed=elapsed,
                  summary=self.stats.summary())
        self.finished.callback(None)
        if self._on_done is not None:
            self._on_done()

    def _stop_progress(self) -> None:
        if self._progress is not None and self._progress.running:
            self._progress.stop()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._done:
            return
        self._stop_progress()
        self.reader.stop_input()
        if self._file_reader is not None:
            self._file_reader.stopProducing()
        self._close_file()
        if not self._eof:
            _log.warn("etl: stopped before the end of its input")
        await _drain_then_stop(self.reader, stop_timeout(self.ctx), self.ctx.reactor, "etl")
        self._done = True
        _log.info("etl: stopped: {summary}", summary=self.stats.summary())
