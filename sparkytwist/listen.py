# -*- test-case-name: tests.test_tap -*-
"""A server listening on an endpoint string, that says where it listens.

With ``reuse_port``, the socket is made here with ``SO_REUSEPORT``, so that
several processes (see :mod:`sparkytwist.workers`) can each listen on the same
address and the kernel spreads connections over them.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkytwist.service import StartupError

_log = Logger()


def parse_tcp_endpoint(description: str) -> tuple[str, int, int]:
    """(interface, port, backlog) of a ``tcp:``/``tcp6:`` server endpoint string."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0].lower() not in ("tcp", "tcp6"):
        raise ValueError(f"several processes on one port need a tcp: endpoint, "
                         f"not {description!r}")
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = int(kwargs.get("port", args[0] if args else "0"))
    default = "::" if parts[0].lower() == "tcp6" else ""
    interface = kwargs.get("interface", default).replace("\\:", ":")
    return interface, port, int(kwargs.get("backlog", "50"))


def tcp_endpoint(interface: str, port: int, backlog: int | None = None) -> str:
    """The ``tcp:`` endpoint string for an address (``parse_tcp_endpoint``'s inverse)."""
    escaped = interface.replace(":", "\\:")
    iface = f":interface={escaped}" if interface else ""
    return f"tcp:{port}{iface}" + (f":backlog={backlog}" if backlog is not None else "")


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


class ListeningService(Service):
    """Listens on ``description`` while running; a failure to listen stops start-up.

    TCP, unix and ssl endpoints listen synchronously, so a busy port surfaces as
    :class:`StartupError` from ``startService`` and twistd exits instead of running
    half a service.
    """

    def __init__(self, name: str, description: str, factory: IProtocolFactory,
                 reactor: Any, *, reuse_port: bool = False, required: bool = True) -> None:
        self.name = name
        self.description = description
        self.factory = factory
        self.reuse_port = reuse_port
        #: False: a failure to listen is logged and the rest runs on (a worker's /metrics)
        self.required = required
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        try:
            if self.reuse_port:
                self._listening(self._listen_reusing_port())
            else:
                self._listen_endpoint()
        except StartupError as e:
            if self.required:
                raise
            _log.warn("{error}; going on without it", error=str(e))
        super().startService()

    def _listen_endpoint(self) -> None:
        endpoint = serverFromString(self._reactor, self.description)
        outcome: list[Any] = []
        d = endpoint.listen(self.factory)
        d.addBoth(outcome.append)
        if not outcome:
            d.addCallback(self._listening)
            d.addErrback(lambda f: _log.failure("{name} cannot listen", f, name=self.name))
        elif isinstance(outcome[0], Failure):
            raise StartupError(
                f"{self.name}: cannot listen on {self.description}: {outcome[0].value}")
        else:
            self._listening(outcome[0])

    def _listen_reusing_port(self) -> IListeningPort:
        try:
            sock = reuse_port_socket(*parse_tcp_endpoint(self.description))
        except (OSError, ValueError) as e:
            raise StartupError(f"{self.name}: cannot listen on {self.description}: {e}") \
                from None
        try:
            port: IListeningPort = self._reactor.adoptStreamPort(
                sock.fileno(), sock.family, self.factory)
        finally:
            sock.close()  # the reactor listens on its own duplicate
        return port

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        shared = f" (SO_REUSEPORT, pid {os.getpid()})" if self.reuse_port else ""
        _log.info("{name} listening on {address}{shared}", name=self.name,
                  address=port.getHost(), shared=shared)

    def endpoint_for_workers(self) -> str:
        """Our tcp endpoint with the port really bound (``tcp:0`` picks one)."""
        assert self.port is not None
        interface, _, backlog = parse_tcp_endpoint(self.description)
        return tcp_endpoint(interface, getattr(self.port.getHost(), "port", 0), backlog)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)
