# -*- test-case-name: tests.test_smtp_replies,tests.test_smtp -*-
"""Our SMTP client to the upstream MTA: one reply per command, every wait bounded.

Not twisted.mail's ESMTPSender: it drops MAIL parameters and can wait forever.
This one only sends lines and matches replies to commands in order (so
several commands may be outstanding, as PIPELINING allows); the proxy decides
what to send. Any wait longer than ``timeout`` aborts the connection, and a
lost connection fails every outstanding command, so a caller never hangs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from sparkytwist.smtp.replies import Reply, ReplyError, ReplyParser

_log = Logger()

#: The longest reply line we buffer (RFC 5321 says 512; be generous).
MAX_REPLY_LINE = 8192


class UpstreamError(Exception):
    """The upstream cannot carry on: connection lost, timed out or spoke nonsense."""


class UpstreamLost(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamRefused(UpstreamError):
    """The upstream greeted us with something other than 220."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def dot_stuff(data: bytes) -> bytes:
    """``data`` as DATA content: leading dots doubled, ended by ``CRLF.CRLF``.

    A dot is doubled after a bare LF too: an upstream that takes a bare LF as a
    line end then cannot be made to see an end of data the client did not send
    (SMTP smuggling).
    """
    stuffed = data.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed.endswith(b"\r\n") or not stuffed:
        return stuffed + b".\r\n"
    return stuffed + b"\r\n.\r\n"


class UpstreamClient(Protocol):
    """One connection to the upstream MTA."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._buf = b""
        self._parser = ReplyParser()
        self.greeting: defer.Deferred[Reply] = defer.Deferred(lambda _: self.abort())
        self._waiting: deque[defer.Deferred[Reply]] = deque([self.greeting])
        self._timer: IDelayedCall | None = None
        self._lost: UpstreamError | None = None
        self.tls = False
        #: Called once when the connection ends for any reason.
        self.on_lost: Callable[[UpstreamError], None] | None = None

    @property
    def alive(self) -> bool:
        return self._lost is None and self.transport is not None

    @property
    def outstanding(self) -> int:
        """Commands sent whose replies have not arrived."""
        return len(self._waiting)

    # -- protocol --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            try:
                reply = self._parser.feed(line)
            except ReplyError as e:
                self._fail(UpstreamError(f"upstream protocol error: {e}"))
                return
            if reply is not None:
                self._deliver(reply)
                if self._lost is not None:
                    return
        self._buf = buf[start:]
        if len(self._buf) > MAX_REPLY_LINE:
            self._fail(UpstreamError("upstream reply line too long"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        if self._lost is None:
            self._lost = UpstreamLost(f"upstream connection lost: {reason.getErrorMessage()}")
        self._fail_waiting(self._lost)
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback(self._lost)

    # -- API -------------------------------------------------------------------------------

    def command(self, line: bytes) -> defer.Deferred[Reply]:
        """Send one command line (without CRLF); fires with its reply."""
        return self._send(line + b"\r\n")

    def send_message(self, data: bytes) -> defer.Deferred[Reply]:
        """Send the message content after a 354; fires with the final reply."""
        return self._send(dot_stuff(data))

    def start_tls(self, options: Any) -> None:
        """Switch to TLS now (after the 220 to our STARTTLS)."""
        assert self.transport is not None
        self.transport.startTLS(options)  # type: ignore[attr-defined]
        self.tls = True

    def quit(self) -> None:
        """Say QUIT and close, not waiting for anything."""
        if self.alive:
            assert self.transport is not None
            self._lost = UpstreamLost("closed by us")
            self.transport.write(b"QUIT\r\n")
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once: whatever we wrote and did not end is not delivered."""
        if self.transport is not None:
            self._lost = self._lost or UpstreamLost("aborted by us")
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- internals -------------------------------------------------------------------------

    def _send(self, data: bytes) -> defer.Deferred[Reply]:
        if self._lost is not None:
            return defer.fail(self._lost)
        assert self.transport is not None
        d: defer.Deferred[Reply] = defer.Deferred()
        self._waiting.append(d)
        self.transport.write(data)
        if len(self._waiting) == 1:
            self._arm()
        return d

    def _deliver(self, reply: Reply) -> None:
        if not self._waiting:
            # e.g. a 421 before the server closes; the close is what we act on
            _log.info("upstream said, unasked: {reply}", reply=str(reply))
            return
        d = self._waiting.popleft()
        if self._waiting:
            self._arm()
        else:
            self._disarm()
        if not d.called:  # a cancelled greeting
            d.callback(reply)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(UpstreamTimeout(f"no upstream reply in {self._timeout:g} s"))

    def _fail(self, error: UpstreamError) -> None:
        if self._lost is None:
            self._lost = error
        self._fail_waiting(error)
        self.abort()

    def _fail_waiting(self, error: UpstreamError) -> None:
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            if not d.called:  # a cancelled greeting
                d.errback(error)


class _OneClient(Factory):
    """connectProtocol's factory, without its two log lines per connection."""

    noisy = False

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client

    def buildProtocol(self, addr: Any) -> UpstreamClient:
        return self._client


def connect(
    reactor: Any, host: str, port: int, *, timeout: float
) -> defer.Deferred[UpstreamClient]:
    """Connect and wait for the greeting; fails with UpstreamError (or a connect error)."""
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    client = UpstreamClient(reactor, timeout)

    def greeted(reply: Reply) -> UpstreamClient:
        if reply.code != 220:
            client.quit()
            raise UpstreamRefused(reply)
        return client

    d: defer.Deferred[Any] = endpoint.connect(_OneClient(client))
    d.addCallback(lambda _: client.greeting)
    result: defer.Deferred[UpstreamClient] = d.addCallback(greeted)
    return result
