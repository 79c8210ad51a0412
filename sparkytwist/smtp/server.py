# -*- test-case-name: tests.test_smtp -*-
"""The client-facing side of the wrapper: an ESMTP server that relays in step.

Each client connection gets its own upstream connection. Commands are taken one
at a time from the client's input, even when the client pipelines them: each is
relayed and its reply awaited before the next is read, so replies go out in
order and the upstream sees exactly the client's sequence. DATA is the one
command answered here (354): the whole message is read, rewritten per
recipient and only then sent upstream; the client gets the upstream's final
reply. See docs/wrapper.md for the multi-recipient design.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from sparkytwist import rewrite
from sparkytwist.smtp import upstream as upstream_mod
from sparkytwist.smtp.commands import ehlo_keywords, filter_ehlo, parse_path, size_param
from sparkytwist.smtp.received import protocol_name, received_header
from sparkytwist.smtp.replies import Reply
from sparkytwist.smtp.stats import WrapperStats
from sparkytwist.smtp.upstream import UpstreamClient, UpstreamError, UpstreamRefused
from sparkytwist.token import TokenCodec

_log = Logger()

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 512
#: MAIL/RCPT may be longer by what their extensions add (RFC 3461: DSN +100/+500).
MAX_PATH_COMMAND_LINE = 1024
#: RFC 4954: AUTH lines (initial response, continuations) up to 12288 octets.
MAX_AUTH_LINE = 12288
#: Recipients accepted in one transaction (RFC 5321 asks for at least 100).
MAX_RECIPIENTS = 1000
#: After an opportunistic STARTTLS to the upstream failed, sessions skip it this long.
TLS_RETRY_AFTER = 300.0
#: Unread client input above which we stop reading while a command is relayed.
PAUSE_INPUT_AT = 256 * 1024

_COMMAND, _DATA, _AUTH = "command", "data", "auth"


@dataclass(frozen=True)
class ProxyConfig:
    """What one wrapper needs from the settings (plus TLS contexts already loaded)."""

    hostname: str
    upstream_host: str
    upstream_port: int
    tracking_base_url: str
    upstream_tls: str = "opportunistic"  # off | opportunistic | required
    upstream_tls_options: Any = None  # client TLS options for the upstream
    server_tls: Any = None  # CertificateOptions for the client's STARTTLS, or None
    auth_passthrough: bool = True
    allow_plain_auth: bool = False
    max_message_size: int = 50 * 1024 * 1024
    max_line_length: int = 100_000
    max_connections: int = 1000
    idle_timeout: float = 300.0
    upstream_timeout: float = 300.0


class WrapperFactory(ServerFactory):
    """Builds a proxy per client; refuses clients over ``max_connections``."""

    noisy = False  # ListeningService says where we listen

    def __init__(
        self,
        config: ProxyConfig,
        codec: TokenCodec,
        stats: WrapperStats,
        reactor: Any,
        *,
        connect_upstream: Callable[[], defer.Deferred[UpstreamClient]] | None = None,
        now: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self.codec = codec
        self.stats = stats
        self.reactor = reactor
        self.now = now
        self.random_bytes = random_bytes
        self.active = 0
        #: until then (``now()`` seconds) opportunistic upstream TLS is not attempted
        self.upstream_tls_broken_until = 0.0
        self._base_url = config.tracking_base_url.rstrip("/")
        self.connect_upstream = connect_upstream or (
            lambda: upstream_mod.connect(
                reactor, config.upstream_host, config.upstream_port,
                timeout=config.upstream_timeout))

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if self.active >= self.config.max_connections:
            self.stats.refused.labels("max_connections").inc()
            return _Refuse(Reply.of(
                421, f"4.7.0 {self.config.hostname} Too many connections, try again later"))
        proto = SMTPProxy(self)
        proto.factory = self
        return proto

    def make_url(self, message_id: str, rcpt: str) -> Callable[[str, str | None], str]:
        base, encode = self._base_url, self.codec.encode

        def make_url(action: str, url: str | None) -> str:
            return f"{base}/{encode(action, message_id, rcpt, url)}"

        return make_url


class _Refuse(Protocol):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.reply.to_bytes())
        self.transport.loseConnection()


@dataclass
class _Transaction:
    mail: bytes  #: the MAIL FROM line, relayed again for each copy
    rcpts: list[tuple[bytes, bytes]] = field(default_factory=list)  #: (address, RCPT line)


class _CopyFailed(Exception):
    def __init__(self, reply: Reply, stage: str) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.stage = stage


class SMTPProxy(Protocol, TimeoutMixin):
    """One client session, relayed to its own upstream connection."""

    def __init__(self, factory: WrapperFactory) -> None:
        self.f = factory
        self.config = factory.config
        self.callLater = factory.reactor.callLater  # type: ignore[method-assign]
        self._buf = bytearray()
        self._busy = True  # until the upstream greeted us
        self._closing = False
        self._paused = False
        self._processing = False
        self._mode = _COMMAND
        self._too_long = False  # discarding the rest of an over-long command line
        self.upstream: UpstreamClient | None = None
        self._connecting: defer.Deferred[UpstreamClient] | None = None
        self._upstream_caps: dict[bytes, bytes] = {}
        self._upstream_dead = False
        self._sending = False  # a message is on its way upstream
        self.helo: bytes | None = None
        self.esmtp = False
        self.tls = False
        self.authenticated = False
        self._txn: _Transaction | None = None
        self._body = bytearray()
        self._body_dropped = 0  # bytes not stored once the message was too big
        self._peer_ip = ""

    # -- connection --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.f.active += 1
        self.f.stats.connections.inc()
        self.f.stats.active.inc()
        peer = self.transport.getPeer()
        self._peer_ip = getattr(peer, "host", "") or ""
        self.setTimeout(self.config.idle_timeout)
        d = self._connecting = self.f.connect_upstream()
        d.addCallbacks(self._upstream_ready, self._upstream_failed)

    def _upstream_ready(self, client: UpstreamClient) -> None:
        self._connecting = None
        if self._closing:
            client.quit()
            return
        self.upstream = client
        client.on_lost = self._upstream_lost
        self._reply(Reply.of(220, f"{self.config.hostname} ESMTP sparkytwist"))
        self._busy = False
        self._process()

    def _upstream_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._closing:
            return
        self.f.stats.refused.labels("upstream_unavailable").inc()
        if isinstance(failure.value, UpstreamRefused) and failure.value.reply.code >= 500:
            reply = failure.value.reply
        else:
            _log.warn("upstream {host}:{port} unavailable: {why}", host=self.config.upstream_host,
                      port=self.config.upstream_port, why=failure.getErrorMessage())
            reply = Reply.of(421, f"4.4.1 {self.config.hostname} Upstream MTA unavailable, "
                             "try again later")
        self._close(reply)

    def _upstream_lost(self, error: UpstreamError) -> None:
        if self._upstream_dead:  # already answered for: the next command gets the 421
            return
        self._upstream_dead = True
        if not self._busy and self._mode != _DATA and not self._closing:
            self._close(Reply.of(421, f"4.4.2 {self.config.hostname} Upstream connection "
                                 "lost, closing"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self.setTimeout(None)
        self.f.active -= 1
        self.f.stats.active.dec()
        if self._connecting is not None:
            self._connecting.cancel()
        up = self.upstream
        if up is None or not up.alive:
            return
        up.on_lost = None
        if self._sending or up.outstanding:
            up.abort()  # the message must not be completed upstream
        elif self._txn is not None:
            self.f.stats.outcome("client_lost")
            up.command(b"RSET").addErrback(lambda _: None)
            up.quit()
        else:
            up.quit()

    def timeoutConnection(self) -> None:
        if self._busy:  # waiting for the upstream, which has its own timeout
            self.resetTimeout()
            return
        if self._mode == _DATA:
            self.f.stats.outcome("client_timeout")
        self._close(Reply.of(421, f"4.4.2 {self.config.hostname} Idle timeout, closing"))

    def _close(self, reply: Reply | None = None) -> None:
        if self.transport is None or self._closing:
            return
        if reply is not None:
            self._reply(reply)
        self._closing = True
        self.transport.loseConnection()

    def _reply(self, reply: Reply) -> None:
        assert self.transport is not None
        self.transport.write(reply.to_bytes())

    def _local(self, code: int, text: str) -> None:
        self._reply(Reply.of(code, text))

    # -- input -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._buf += data
        self._process()

    def _process(self) -> None:
        """Handle buffered input until it runs out or a command waits for the upstream."""
        self._processing = True
        try:
            self._process_input()
        finally:
            self._processing = False
        self._flow_control()

    def _process_input(self) -> None:
        buf = self._buf
        while not self._busy and not self._closing:
            if self._mode == _DATA:
                if not self._read_body():
                    break
                buf = self._buf
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_AUTH_LINE:
                    self._too_long = True
                    del buf[:]
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._too_long:
                self._too_long = False
                self._local(500, "5.5.2 Line too long")
                continue
            self._line(line)
            buf = self._buf

    def _flow_control(self) -> None:
        if self.transport is None or self._closing:
            return
        if not self._paused and len(self._buf) > PAUSE_INPUT_AT:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        elif self._paused and len(self._buf) <= PAUSE_INPUT_AT:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a command handler; input waits until it is done."""
        self._busy = True
        d = defer.Deferred.fromCoroutine(coroutine)
        d.addErrback(self._handler_failed)
        d.addBoth(self._handler_done)

    def _handler_failed(self, failure: Failure) -> None:
        if failure.check(UpstreamError):
            self._upstream_dead = True
            _log.warn("upstream failed: {why}", why=failure.getErrorMessage())
            self._sending = False
            self._txn = None
            self._local(451, "4.4.2 Upstream connection lost or timed out, try again later")
            return
        _log.failure("wrapper: unexpected error", failure)
        self._close(Reply.of(421, "4.3.0 Internal error, closing"))

    def _handler_done(self, _: object) -> None:
        self._busy = False
        if not self._closing and not self._processing:
            self._process()

    # -- commands ----------------------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        if self._mode == _AUTH:
            if len(line) + 2 > MAX_AUTH_LINE:
                self._mode = _COMMAND
                self._local(500, "5.5.2 Line too long")
                return
            self._run(self._auth_step(line))
            return
        verb = line[:8].split(b" ", 1)[0].upper()
        limit = MAX_COMMAND_LINE
        if verb in (b"MAIL", b"RCPT"):
            limit = MAX_PATH_COMMAND_LINE
        elif verb == b"AUTH":
            limit = MAX_AUTH_LINE
        if len(line) + 2 > limit:
            self._local(500, "5.5.2 Line too long")
            return
        if self._upstream_dead and verb != b"QUIT":
            self._close(Reply.of(421, f"4.4.2 {self.config.hostname} Upstream connection "
                                 "lost, closing"))
            return
        if verb == b"EHLO":
            self._run(self._ehlo(line, esmtp=True))
        elif verb == b"HELO":
            self._run(self._ehlo(line, esmtp=False))
        elif verb == b"MAIL":
            self._mail(line)
        elif verb == b"RCPT":
            self._rcpt(line)
        elif verb == b"DATA":
            self._data(line)
        elif verb in (b"RSET", b"NOOP"):
            if verb == b"RSET":
                self._txn = None
            self._run(self._relay(line))
        elif verb == b"QUIT":
            self._run(self._quit())
        elif verb == b"STARTTLS":
            self._starttls(line)
        elif verb == b"AUTH":
            self._auth(line)
        elif verb == b"VRFY":
            self._local(252, "2.5.0 Cannot VRFY user, but will accept message and attempt "
                             "delivery")
        elif verb == b"EXPN":
            self._local(502, "5.5.1 EXPN not supported")
        elif verb == b"HELP":
            self._local(214, "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY "
                             "STARTTLS AUTH")
        else:
            self._local(500, "5.5.2 Command unrecognized")

    async def _relay(self, line: bytes) -> None:
        assert self.upstream is not None
        self._reply(await self.upstream.command(line))

    async def _quit(self) -> None:
        up = self.upstream
        if up is not None and up.alive:
            with contextlib.suppress(UpstreamError):
                await up.command(b"QUIT")
            up.quit()
        self._close(Reply.of(221, f"2.0.0 {self.config.hostname} Bye"))

    async def _ehlo(self, line: bytes, *, esmtp: bool) -> None:
        up = self.upstream
        assert up is not None
        name = line[5:].strip()
        if not name or b" " in name:
            self._local(501, f"5.5.4 Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        reply = await up.command(b"EHLO " + name)
        if not reply.positive and not esmtp:
            reply = await up.command(b"HELO " + name)
        elif reply.positive and not up.tls and self._upstream_tls_wanted():
            secured = await self._upstream_starttls(name, reply)
            if secured is None:
                return
            reply = secured
        if not reply.positive:
            self._reply(reply)
            return
        self._upstream_caps = ehlo_keywords(reply) if reply.positive else {}
        self.helo, self.esmtp, self._txn = name, esmtp, None
        greeting = f"{self.config.hostname} Hello".encode() + b" " + name
        if not esmtp:
            self._reply(Reply(250, (greeting,)))
            return
        self._reply(filter_ehlo(
            reply, greeting=greeting, max_size=self.config.max_message_size,
            starttls=self.config.server_tls is not None and not self.tls,
            auth=self._auth_allowed()))

    async def _upstream_starttls(self, name: bytes, ehlo: Reply) -> Reply | None:
        """STARTTLS to the upstream right after its first EHLO; the new EHLO reply."""
        up = self.upstream
        assert up is not None
        required = self.config.upstream_tls == "required"
        if b"STARTTLS" not in ehlo_keywords(ehlo):
            if required:
                _log.error("upstream does not offer STARTTLS and upstream_tls = required")
                self._close(Reply.of(421, f"4.7.0 {self.config.hostname} Upstream TLS "
                                     "unavailable, try again later"))
                return None
            return ehlo
        reply = await up.command(b"STARTTLS")
        if reply.code != 220:
            if required:
                _log.error("upstream refused STARTTLS: {reply}", reply=str(reply))
                self._close(Reply.of(421, f"4.7.0 {self.config.hostname} Upstream TLS "
                                     "unavailable, try again later"))
                return None
            return ehlo
        up.start_tls(self.config.upstream_tls_options)
        try:
            return await up.command(b"EHLO " + name)
        except UpstreamError as e:
            if required:
                raise
            return await self._upstream_in_clear(name, e)

    def _upstream_tls_wanted(self) -> bool:
        if self.config.upstream_tls == "off":
            return False
        return self.config.upstream_tls == "required" or \
            self.f.now() >= self.f.upstream_tls_broken_until

    async def _upstream_in_clear(self, name: bytes, error: UpstreamError) -> Reply:
        """Opportunistic TLS failed (a bad handshake): go on in clear on a new connection.

        Opportunistic means TLS must never stop mail. For TLS_RETRY_AFTER seconds
        the factory's new sessions then skip the attempt, instead of failing a
        handshake on every connection.
        """
        _log.warn("upstream TLS failed ({why}); upstream_tls = opportunistic: going on in "
                  "clear, retrying TLS in {later:g}s", why=str(error), later=TLS_RETRY_AFTER)
        self.f.stats.tls_fallbacks.inc()
        self.f.upstream_tls_broken_until = self.f.now() + TLS_RETRY_AFTER
        old = self.upstream
        assert old is not None
        old.on_lost = None
        old.abort()
        client = await self.f.connect_upstream()
        self.upstream, self._upstream_dead = client, False
        client.on_lost = self._upstream_lost
        return await client.command(b"EHLO " + name)

    def _auth_allowed(self) -> bool:
        return self.config.auth_passthrough and (self.tls or self.config.allow_plain_auth)

    def _mail(self, line: bytes) -> None:
        if self.helo is None:
            self._local(503, "5.5.1 Send EHLO first")
            return
        if self._txn is not None:
            self._local(503, "5.5.1 Nested MAIL command")
            return
        parsed = parse_path(line)
        if parsed is None:
            self._local(501, "5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        size = size_param(parsed[1])
        if size is not None and size > self.config.max_message_size:
            self.f.stats.outcome("too_big_declared")
            self._local(552, "5.3.4 Message size exceeds fixed maximum message size")
            return
        self._run(self._relay_mail(line))

    async def _relay_mail(self, line: bytes) -> None:
        assert self.upstream is not None
        reply = await self.upstream.command(line)
        if reply.positive:
            self._txn = _Transaction(line)
        self._reply(reply)

    def _rcpt(self, line: bytes) -> None:
        if self._txn is None:
            self._local(503, "5.5.1 Need MAIL before RCPT")
            return
        parsed = parse_path(line)
        if parsed is None or not parsed[0]:
            self._local(501, "5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        if len(self._txn.rcpts) >= MAX_RECIPIENTS:
            self._local(452, "4.5.3 Too many recipients")
            return
        self._run(self._relay_rcpt(parsed[0], line))

    async def _relay_rcpt(self, address: bytes, line: bytes) -> None:
        assert self.upstream is not None
        reply = await self.upstream.command(line)
        if reply.positive and self._txn is not None:
            self._txn.rcpts.append((address, line))
        self._reply(reply)

    def _starttls(self, line: bytes) -> None:
        if line.strip().upper() != b"STARTTLS":
            self._local(501, "5.5.4 Syntax: STARTTLS")
        elif self.config.server_tls is None:
            self._local(502, "5.5.1 STARTTLS not available")
        elif self.tls:
            self._local(503, "5.5.1 TLS already active")
        elif self._txn is not None:
            self._local(503, "5.5.1 STARTTLS not allowed during a mail transaction")
        else:
            if self._buf:
                # Whatever came after STARTTLS in clear text was not protected by TLS
                # (CVE-2011-0411 style command injection): drop it.
                self.f.stats.discarded.inc()
                _log.warn("discarded {n} bytes pipelined after STARTTLS from {ip}",
                          n=len(self._buf), ip=self._peer_ip)
                del self._buf[:]
            self._local(220, "2.0.0 Ready to start TLS")
            assert self.transport is not None
            self.transport.startTLS(self.config.server_tls)  # type: ignore[attr-defined]
            self.tls = True
            self.helo, self.esmtp, self.authenticated = None, False, False

    def _auth(self, line: bytes) -> None:
        if not (self._auth_allowed() and b"AUTH" in self._upstream_caps):
            if (self.config.auth_passthrough and not self.tls
                    and self.config.server_tls is not None):
                self._local(530, "5.7.0 Must issue a STARTTLS command first")
            else:
                self._local(502, "5.5.1 AUTH not available")
        elif self.helo is None or not self.esmtp:
            self._local(503, "5.5.1 Send EHLO first")
        elif self.authenticated:
            self._local(503, "5.5.1 Already authenticated")
        elif self._txn is not None:
            self._local(503, "5.5.1 AUTH not allowed during a mail transaction")
        else:
            self._run(self._auth_step(line))

    async def _auth_step(self, line: bytes) -> None:
        """Relay one AUTH line (command or continuation); never logged."""
        assert self.upstream is not None
        reply = await self.upstream.command(line)
        if reply.code == 334:
            self._mode = _AUTH
        else:
            self._mode = _COMMAND
            if reply.code == 235:
                self.authenticated = True
        self._reply(reply)

    def _data(self, line: bytes) -> None:
        if line.strip().upper() != b"DATA":
            self._local(501, "5.5.4 Syntax: DATA")
        elif self._txn is None:
            self._local(503, "5.5.1 Need MAIL command")
        elif not self._txn.rcpts:
            self._local(554, "5.5.1 No valid recipients")
        else:
            self._mode = _DATA
            self._body = bytearray(b"\r\n")  # so the end marker is always CRLF.CRLF
            self._body_dropped = 0
            self._local(354, "End data with <CR><LF>.<CR><LF>")

    # -- DATA --------------------------------------------------------------------------------

    def _read_body(self) -> bool:
        """Move input into the message until its end; True once the whole message is in."""
        body = self._body
        start = max(0, len(body) - 4)
        body += self._buf
        self._buf = bytearray()
        end = body.find(b"\r\n.\r\n", start)
        if end < 0:
            if len(body) > self.config.max_message_size + 2:
                # too big: keep counting until the end, store only what could be the marker
                self._body_dropped += len(body) - 4
                self._body = bytearray(body[-4:])
            return False
        self._buf = bytearray(body[end + 5 :])
        size = self._body_dropped + end
        oversize = self._body_dropped > 0 or size > self.config.max_message_size
        message = b"" if oversize else bytes(body[: end + 2])
        self._body = bytearray()
        self._body_dropped = 0
        self._mode = _COMMAND
        self.f.stats.bytes_in.inc(size)
        self._run(self._deliver(message, oversize=oversize))
        return True

    async def _deliver(self, stuffed: bytes, *, oversize: bool) -> None:
        txn, self._txn = self._txn, None
        assert txn is not None and self.upstream is not None
        if self._upstream_dead:
            raise upstream_mod.UpstreamLost("upstream lost during DATA")
        if oversize:
            self.f.stats.outcome("too_big")
            await self._reset_upstream()
            self._local(552, "5.3.4 Message size exceeds fixed maximum message size")
            return
        message = stuffed.replace(b"\r\n..", b"\r\n.")[2:]
        if len(message) > self.config.max_line_length and max(
                map(len, message.split(b"\n"))) > self.config.max_line_length + 1:
            self.f.stats.outcome("line_too_long")
            await self._reset_upstream()
            self._local(500, f"5.5.2 Message has a line longer than "
                             f"{self.config.max_line_length} octets")
            return
        options = rewrite.read_tracking_options(message)
        try:
            if len(txn.rcpts) == 1:
                await self._deliver_one(message, txn, options)
            else:
                await self._deliver_copies(message, txn, options)
        except UpstreamError as e:
            self.f.stats.outcome(
                "upstream_timeout" if isinstance(e, upstream_mod.UpstreamTimeout)
                else "upstream_lost")
            raise

    async def _reset_upstream(self) -> None:
        assert self.upstream is not None
        reply = await self.upstream.command(b"RSET")
        if not reply.positive:
            raise UpstreamError(f"upstream refused RSET: {reply}")

    def _copy(self, message: rewrite.PreparedMessage, message_id: str, rcpt: bytes) -> bytes:
        """This recipient's copy: trace header, message id, tracked links and pixels.

        ``message`` was scanned once (rewrite.prepare_message); only the URLs are
        made per copy.
        """
        now = self.f.now()
        received = received_header(
            helo=self.helo or b"unknown", client_ip=self._peer_ip, hostname=self.config.hostname,
            protocol=protocol_name(esmtp=self.esmtp, tls=self.tls,
                                   authenticated=self.authenticated),
            message_id=message_id, rcpt=rcpt, now=now)
        result = message.rewrite(
            message_id=message_id,
            make_url=self.f.make_url(message_id, rcpt.decode("utf-8", "replace")),
            received=received)
        self.f.stats.rewritten(result)
        return result.data

    def _new_id(self) -> str:
        return rewrite.new_message_id(self.f.now(), self.f.random_bytes)

    async def _deliver_one(self, message: bytes, txn: _Transaction,
                           options: rewrite.MessageOptions) -> None:
        up = self.upstream
        assert up is not None
        rcpt = txn.rcpts[0][0]
        data = self._copy(rewrite.prepare_message(message, options.plan),
                          options.message_id or self._new_id(), rcpt)
        reply = await up.command(b"DATA")
        if reply.code != 354:
            self.f.stats.outcome("refused")
            await self._reset_upstream()
            self._reply(reply)
            return
        self._sending = True
        final = await up.send_message(data)
        self._sending = False
        if final.positive:
            self.f.stats.outcome("relayed")
            self.f.stats.copies.inc()
            self.f.stats.bytes_out.inc(len(data))
        else:
            self.f.stats.outcome("refused")
        self._reply(final)

    async def _deliver_copies(self, message: bytes, txn: _Transaction,
                              options: rewrite.MessageOptions) -> None:
        """One personalised copy per recipient, each in its own upstream transaction.

        The recipients were RCPT'd together (their replies went to the client);
        that transaction is reset and each copy then gets MAIL (same line), RCPT
        (that recipient's line) and DATA. The first failure stops the rest.
        """
        up = self.upstream
        assert up is not None
        await self._reset_upstream()
        pipelining = b"PIPELINING" in self._upstream_caps
        delivered = 0
        last: Reply | None = None
        prepared = rewrite.prepare_message(message, options.plan)  # scanned once for all copies
        try:
            for rcpt, rcpt_line in txn.rcpts:
                data = self._copy(prepared, self._new_id(), rcpt)
                last = await self._send_copy(up, txn.mail, rcpt_line, data, pipelining)
                delivered += 1
                self.f.stats.copies.inc()
                self.f.stats.bytes_out.inc(len(data))
        except _CopyFailed as failed:
            if failed.stage != "final":
                await self._reset_upstream()
            if delivered == 0 and failed.stage in ("data", "final"):
                # refused for its content before anything went out: the same for all
                self.f.stats.outcome("refused")
                self._reply(failed.reply)
                return
            self.f.stats.outcome("partial" if delivered else "copy_refused")
            _log.warn("copy {n} of {total} refused by the upstream ({reply}); "
                      "{delivered} delivered; answered 451",
                      n=delivered + 1, total=len(txn.rcpts), reply=str(failed.reply),
                      delivered=delivered)
            self._local(451, f"4.3.0 Copy {delivered + 1} of {len(txn.rcpts)} refused "
                             f"upstream ({failed.reply.code}), try again later")
            return
        assert last is not None
        self.f.stats.outcome("relayed")
        self._reply(last)

    async def _send_copy(self, up: UpstreamClient, mail: bytes, rcpt: bytes, data: bytes,
                         pipelining: bool) -> Reply:
        if pipelining:
            replies = [up.command(mail), up.command(rcpt), up.command(b"DATA")]
            mail_reply, rcpt_reply, data_reply = [await d for d in replies]
        else:
            mail_reply = await up.command(mail)
            if not mail_reply.positive:
                raise _CopyFailed(mail_reply, "mail")
            rcpt_reply = await up.command(rcpt)
            if not rcpt_reply.positive:
                raise _CopyFailed(rcpt_reply, "rcpt")
            data_reply = await up.command(b"DATA")
        if not mail_reply.positive or not rcpt_reply.positive:
            if data_reply.code == 354:  # cannot end it without delivering something
                up.abort()
                raise UpstreamError("upstream took DATA after refusing the envelope")
            raise _CopyFailed(mail_reply if not mail_reply.positive else rcpt_reply,
                              "mail" if not mail_reply.positive else "rcpt")
        if data_reply.code != 354:
            raise _CopyFailed(data_reply, "data")
        self._sending = True
        final = await up.send_message(data)
        self._sending = False
        if not final.positive:
            raise _CopyFailed(final, "final")
        return final
