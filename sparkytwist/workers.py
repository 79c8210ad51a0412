# -*- test-case-name: tests.test_tracker_service -*-
"""More processes on one port: ``<part>_workers = N`` for the tracker and the wrapper.

The main process listens with ``SO_REUSEPORT`` and spawns N-1 workers
(``python -m sparkytwist.workers <part>``) that listen on the same address; the
kernel spreads connections over all of them. Workers get every setting and the
main process's Redis URL through the environment (not the command line: ``ps``
would show secrets), are restarted with backoff if they die, and stop with the
service. A worker's stdin is a pipe from the main process: if the main process
dies, its workers stop too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IProtocolFactory, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sparkytwist.backoff import Backoff
from sparkytwist.config import Settings, describe, format_default
from sparkytwist.listen import ListeningService, parse_tcp_endpoint, tcp_endpoint
from sparkytwist.service import Context, OrderedService

_log = Logger()

WORKER_MODULE = "sparkytwist.workers"
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
STOP_TIMEOUT = 15.0


def listen_with_workers(ctx: Context, part: str, description: str,
                        factory: IProtocolFactory, count: int) -> IService:
    """A listener for ``part``; with ``count`` > 1, also count-1 workers on its port."""
    listener = ListeningService(part, description, factory, ctx.reactor, reuse_port=count > 1)
    if count <= 1 or ctx.worker:
        return listener
    top = OrderedService()
    top.setName(part)
    listener.setServiceParent(top)

    def environment(slot: int) -> dict[str, str]:
        return worker_environment(ctx.settings, ctx.redis.url, {
            f"{part}_endpoint": listener.endpoint_for_workers(),
            **worker_admin(ctx.settings, part, slot)})

    WorkerPool(ctx.reactor, part, count - 1, environment).setServiceParent(top)
    return top


def worker_admin(settings: Settings, part: str, slot: int) -> dict[str, str]:
    """Worker ``slot`` (1, 2, ...) of ``part`` gets its own /metrics on the admin port + n.

    Prometheus scrapes each process (the main one on ``admin_endpoint``, its workers on
    the ports after it: tracker workers first, then wrapper workers); a worker that is
    restarted gets its slot's port again. No admin port (or port 0): workers have none.
    """
    try:
        interface, port, _ = parse_tcp_endpoint(settings.admin_endpoint)
    except ValueError:
        port = 0
    if not settings.admin_enabled or not port:
        return {"admin_enabled": "false"}
    offset = slot if part == "tracker" else max(settings.tracker_workers - 1, 0) + slot
    return {"admin_endpoint": tcp_endpoint(interface, port + offset)}


def worker_environment(settings: Settings, redis_url: str,
                       overrides: dict[str, str]) -> dict[str, str]:
    """A worker's environment: every setting as SPARKYTWIST_*, our Redis, our port."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARKYTWIST_", "SPARKPOST_"))}
    for info in describe():
        env[info.env_names[0]] = format_default(getattr(settings, info.name))
    if redis_url:
        env["SPARKYTWIST_REDIS_URL"] = redis_url
    for name, value in overrides.items():
        env[f"SPARKYTWIST_{name.upper()}"] = value
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, slot: int, started_at: float) -> None:
        self.pool = pool
        self.slot = slot
        self.started_at = started_at
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport else None

    def outReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            _log.info("{part} worker {pid}: {line}", part=self.pool.part, pid=self.pid,
                      line=line.decode("utf-8", "replace").rstrip())

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """``count`` worker processes of ``part``, restarted with backoff while running."""

    def __init__(self, reactor: Any, part: str, count: int,
                 environment: Callable[[int], dict[str, str]]) -> None:
        self._reactor = reactor
        self.part = part
        self.name = f"{part}-workers"
        self.count = count
        self._environment = environment
        self.workers: list[_WorkerProtocol] = []
        self._backoff = Backoff(RESTART_FIRST, RESTART_MAX)
        self._failures = 0  #: restarts in a row of workers that did not live long
        self._restarts: list[Any] = []

    def startService(self) -> None:
        super().startService()
        for slot in range(1, self.count + 1):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        if not self.running:
            return
        worker = _WorkerProtocol(self, slot, self._reactor.seconds())
        argv = [sys.executable, "-m", WORKER_MODULE, self.part]
        self._reactor.spawnProcess(worker, sys.executable, argv,
                                   env=self._environment(slot),
                                   childFDs={0: "w", 1: "r", 2: "r"})
        self.workers.append(worker)
        _log.info("{part} worker {pid} started", part=self.part, pid=worker.pid)

    def ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if not self.running:
            return
        lived = self._reactor.seconds() - worker.started_at
        self._failures = 0 if lived > 2 * RESTART_MAX else self._failures + 1
        delay = self._backoff.delay(self._failures)
        _log.warn("{part} worker {pid} ended ({reason}); restarting in {delay:g}s",
                  part=self.part, pid=worker.pid, reason=reason.getErrorMessage(),
                  delay=delay)
        self._restarts = [c for c in self._restarts if c.active()]
        self._restarts.append(self._reactor.callLater(delay, self._spawn, worker.slot))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        for call in self._restarts:
            if call.active():
                call.cancel()
        self._restarts = []
        return defer.Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        workers = list(self.workers)
        for worker in workers:
            _signal(worker, "TERM")
        waiting = defer.DeferredList([w.ended for w in workers])

        def kill() -> None:
            for worker in workers:
                _signal(worker, "KILL")

        timer = self._reactor.callLater(STOP_TIMEOUT, kill)
        await waiting
        if timer.active():
            timer.cancel()
        _log.info("{part} workers stopped", part=self.part)


def _signal(worker: _WorkerProtocol, name: str) -> None:
    if worker.transport is None:
        return
    with contextlib.suppress(error.ProcessExitedAlready):
        worker.transport.signalProcess(name)


@implementer(IReadDescriptor)
class ParentWatch:
    """Stops the reactor when the main process's end of our stdin goes away."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Any:
        from twisted.internet import main

        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        if self._reactor.running:
            self._reactor.stop()

    def logPrefix(self) -> str:
        return "main-process-watch"


def main(argv: list[str] | None = None) -> None:
    """A worker: one part only, its own admin port, the main process's Redis, logs to stdout."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])

    from twisted.internet import reactor

    from sparkytwist.config import ConfigError, load_settings
    from sparkytwist.service import ProgramService
    from sparkytwist.tap import build_core, build_part

    part = (argv or sys.argv)[1]
    try:
        settings = load_settings(None, os.environ)
    except ConfigError as e:
        raise SystemExit(f"{part} worker: {e}") from None
    top = ProgramService(f"{part} worker")
    ctx = build_core(settings, reactor, top, worker=True)
    service = build_part(part, ctx)
    if service is None:
        raise SystemExit(f"{part} worker: the part cannot run")
    service.setServiceParent(top)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    os.set_blocking(0, False)
    reactor.addReader(ParentWatch(reactor))
    reactor.run()


if __name__ == "__main__":
    main()
