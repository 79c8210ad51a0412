# -*- test-case-name: tests.test_tracker_service -*-
"""The tracker part: recorder, listening port, and (tracker_workers > 1) worker processes.

Several processes share one TCP port through ``SO_REUSEPORT``: each creates its
own listening socket on the same address and the kernel spreads connections
over them. The main process spawns ``tracker_workers - 1`` workers
(``python -m sparkytwist.tracker.worker``), hands them its settings and its Redis
URL through the environment (not the command line: ``ps`` would show secrets),
restarts a worker that dies and stops them all with the service. A worker's stdin
is a pipe from the main process: if the main process dies, the worker stops too.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkytwist.config import Settings, describe, format_default
from sparkytwist.listen import ListeningService
from sparkytwist.service import Context, OrderedService, StartupError
from sparkytwist.tracker.bots import BotClassifier
from sparkytwist.tracker.clientip import ClientAddress
from sparkytwist.tracker.ratelimit import PerClientLimiter
from sparkytwist.tracker.recorder import EventRecorder
from sparkytwist.tracker.resource import TrackerResource, TrackerSite

_log = Logger()

#: Set (to anything) in the environment: every response says which process served it
#: in ``X-Sparky-Worker`` (a debugging aid; off by default).
WORKER_HEADER_ENV = "SPARKY_TRACKER_WORKER_HEADER"
WORKER_MODULE = "sparkytwist.tracker.worker"
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
STOP_TIMEOUT = 15.0


def build_site(ctx: Context, recorder: EventRecorder) -> TrackerSite:
    s = ctx.settings
    root = TrackerResource(
        ctx.codec, recorder, clock=ctx.reactor, metrics=ctx.metrics,
        client_address=ClientAddress(s.trusted_proxies), bots=BotClassifier(),
        limiter=PerClientLimiter(s.per_ip_rate, s.per_ip_burst, ctx.reactor),
        bot_events=s.bot_events, root_redirect=s.root_redirect,
        worker_header=bool(os.environ.get(WORKER_HEADER_ENV)))
    return TrackerSite(root)


def make_recorder(ctx: Context) -> EventRecorder:
    return EventRecorder(
        ctx.redis, ctx.keys, maxlen=ctx.settings.events_maxlen,
        capacity=ctx.settings.tracker_buffer, clock=ctx.reactor, metrics=ctx.metrics)


def make_service(ctx: Context) -> IService:
    """The tracker of ``twistd sparkytrack``."""
    return build_tracker(ctx, reuse_port=ctx.settings.tracker_workers > 1,
                         workers=ctx.settings.tracker_workers - 1)


def build_tracker(ctx: Context, *, reuse_port: bool, workers: int) -> OrderedService:
    top = OrderedService()
    top.setName("tracker")
    recorder = make_recorder(ctx)
    recorder.setServiceParent(top)
    site = build_site(ctx, recorder)
    listener: ReusePortService | ListeningService
    if reuse_port:
        listener = ReusePortService("tracker", ctx.settings.tracker_endpoint, site, ctx.reactor)
    else:
        listener = ListeningService("tracker", ctx.settings.tracker_endpoint, site, ctx.reactor)
    listener.setServiceParent(top)
    if workers > 0:
        assert isinstance(listener, ReusePortService)
        bound = listener

        def environment() -> dict[str, str]:
            return worker_environment(ctx.settings, ctx.redis.url, bound.endpoint_for_workers())

        WorkerPool(ctx.reactor, workers, environment).setServiceParent(top)
    return top


# -- SO_REUSEPORT listening ---------------------------------------------------------


def parse_tcp_endpoint(description: str) -> tuple[str, int, int]:
    """(interface, port, backlog) of a ``tcp:``/``tcp6:`` server endpoint string."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0].lower() not in ("tcp", "tcp6"):
        raise ValueError(f"several tracker workers need a tcp: endpoint, not {description!r}")
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = int(kwargs.get("port", args[0] if args else "0"))
    default = "::" if parts[0].lower() == "tcp6" else ""
    interface = kwargs.get("interface", default).replace("\\:", ":")
    return interface, port, int(kwargs.get("backlog", "50"))


def reuse_port_socket(interface: str, port: int, backlog: int) -> socket.socket:
    """A listening, non-blocking TCP socket with SO_REUSEPORT set."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or "0.0.0.0", port))  # noqa: S104 - the operator's choice
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ReusePortService(Service):
    """Listens like :class:`ListeningService`, on a socket other processes may share."""

    def __init__(self, name: str, description: str, factory: IProtocolFactory,
                 reactor: Any) -> None:
        self.name = name
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        try:
            interface, port, backlog = parse_tcp_endpoint(self.description)
            sock = reuse_port_socket(interface, port, backlog)
        except (OSError, ValueError) as e:
            raise StartupError(f"{self.name}: cannot listen on {self.description}: {e}") \
                from None
        try:
            self.port = self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory)
        finally:
            sock.close()  # the reactor listens on its own duplicate
        _log.info("{name} listening on {address} (SO_REUSEPORT, pid {pid})", name=self.name,
                  address=self.port.getHost() if self.port else None, pid=os.getpid())
        super().startService()

    def endpoint_for_workers(self) -> str:
        """Our endpoint with the port we really got (``tcp:0`` picks one)."""
        assert self.port is not None
        interface, _, backlog = parse_tcp_endpoint(self.description)
        escaped = interface.replace(":", "\\:")
        iface = f":interface={escaped}" if interface else ""
        port = getattr(self.port.getHost(), "port", 0)
        return f"tcp:{port}{iface}:backlog={backlog}"

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)


# -- worker processes ---------------------------------------------------------------


def worker_environment(settings: Settings, url: str, endpoint: str) -> dict[str, str]:
    """The environment of a worker: every setting as SPARKYTWIST_*, our Redis, one port."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPARKYTWIST_", "SPARKPOST_"))}
    for info in describe():
        env[info.env_names[0]] = format_default(getattr(settings, info.name))
    env["SPARKYTWIST_REDIS_URL"] = url
    env["SPARKYTWIST_TRACKER_ENDPOINT"] = endpoint
    env["SPARKYTWIST_TRACKER_WORKERS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport else None

    def outReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            _log.info("tracker worker {pid}: {line}", pid=self.pid,
                      line=line.decode("utf-8", "replace").rstrip())

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """``count`` worker processes, restarted (with backoff) while the service runs."""

    name = "tracker-workers"

    def __init__(self, reactor: Any, count: int,
                 environment: Callable[[], dict[str, str]]) -> None:
        self._reactor = reactor
        self.count = count
        self._environment = environment
        self.workers: list[_WorkerProtocol] = []
        self._delay = RESTART_FIRST
        self._restarts: list[Any] = []

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    def startService(self) -> None:
        super().startService()
        for _ in range(self.count):
            self._spawn()

    def _spawn(self) -> None:
        if not self.running:
            return
        worker = _WorkerProtocol(self)
        argv = [sys.executable, "-m", WORKER_MODULE]
        self._reactor.spawnProcess(worker, sys.executable, argv, env=self._environment(),
                                   childFDs={0: "w", 1: "r", 2: "r"})
        worker.started_at = self._reactor.seconds()  # type: ignore[attr-defined]
        self.workers.append(worker)
        _log.info("tracker worker {pid} started", pid=worker.pid)

    def ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if not self.running:
            return
        lived = self._reactor.seconds() - getattr(worker, "started_at", 0.0)
        self._delay = RESTART_FIRST if lived > 2 * RESTART_MAX else \
            min(RESTART_MAX, self._delay * 2)
        _log.warn("tracker worker {pid} ended ({reason}); restarting in {delay:g}s",
                  pid=worker.pid, reason=reason.getErrorMessage(), delay=self._delay)
        self._restarts = [c for c in self._restarts if c.active()]
        self._restarts.append(self._reactor.callLater(self._delay, self._spawn))

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
        _log.info("tracker workers stopped")


def _signal(worker: _WorkerProtocol, name: str) -> None:
    if worker.transport is None:
        return
    with contextlib.suppress(error.ProcessExitedAlready):
        worker.transport.signalProcess(name)
