# -*- test-case-name: tests.test_tap -*-
"""A server listening on an endpoint string, that says where it listens."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkytwist.service import StartupError

_log = Logger()


class ListeningService(Service):
    """Listens on ``description`` while running; a failure to listen stops start-up.

    TCP, unix and ssl endpoints listen synchronously, so a busy port surfaces as
    :class:`StartupError` from ``startService`` and twistd exits instead of running
    half a service.
    """

    def __init__(self, name: str, description: str, factory: IProtocolFactory,
                 reactor: Any) -> None:
        self.name = name
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
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
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        _log.info("{name} listening on {address}", name=self.name, address=port.getHost())

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)
