"""A real SMTP server for tests: records transactions, replies as scripted.

Listens on loopback (or runs in memory over iosim); supports PIPELINING (replies
in order), STARTTLS, AUTH PLAIN/LOGIN, DSN/SIZE parameters (recorded verbatim),
and faults: scripted replies per command, a hook for anything cleverer, never
answering a command, or dropping the connection in the middle of DATA.

``python -m tests.support.smtp_sink PORT`` runs one standalone (the benchmark's).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure

DEFAULT_EXTENSIONS = (
    b"PIPELINING", b"SIZE 100000000", b"8BITMIME", b"SMTPUTF8", b"DSN", b"ENHANCEDSTATUSCODES",
    b"CHUNKING", b"XCLIENT NAME ADDR", b"ETRN",
)


@dataclass
class Transaction:
    helo: bytes
    mail: bytes  #: the whole MAIL FROM line
    rcpts: list[bytes] = field(default_factory=list)  #: the whole RCPT TO lines
    data: bytes = b""  #: the message, dot-unstuffed
    tls: bool = False
    user: bytes | None = None  #: authenticated as

    @property
    def rcpt_addresses(self) -> list[str]:
        out = []
        for line in self.rcpts:
            start, end = line.index(b"<") + 1, line.index(b">")
            out.append(line[start:end].decode())
        return out


class SinkFactory(ServerFactory):
    """Shared state of every connection to the sink."""

    def __init__(
        self,
        *,
        tls: Any = None,
        users: dict[bytes, bytes] | None = None,
        extensions: tuple[bytes, ...] = DEFAULT_EXTENSIONS,
        hostname: bytes = b"sink.test",
        record: bool = True,
    ) -> None:
        self.tls = tls
        self.users = users or {}
        self.extensions = extensions
        self.hostname = hostname
        self.record = record
        self.transactions: list[Transaction] = []
        self.delivered = 0
        #: verb (upper-case bytes) -> queue of raw replies (with CRLF) to use next
        self.script: dict[bytes, list[bytes]] = {}
        #: called for every command line; a non-None return is the raw reply
        self.hook: Callable[[SinkProtocol, bytes, bytes], bytes | None] | None = None
        #: verbs never answered (the connection just sits there)
        self.hang: set[bytes] = set()
        #: close the connection after this many DATA content bytes (None: never)
        self.drop_in_data_after: int | None = None
        self.commands: list[bytes] = []  #: every command line, in order (AUTH lines masked)
        self.connections: list[SinkProtocol] = []
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        proto = SinkProtocol(self)
        proto.factory = self
        self.connections.append(proto)
        return proto

    def wait_for(self, n: int) -> defer.Deferred[None]:
        """Fires once ``n`` transactions have been delivered."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((n, d))
        self._check()
        return d

    def delivered_one(self, txn: Transaction) -> None:
        self.delivered += 1
        if self.record:
            self.transactions.append(txn)
        self._check()

    def _check(self) -> None:
        ready = [(n, d) for n, d in self._waiters if self.delivered >= n]
        self._waiters = [(n, d) for n, d in self._waiters if self.delivered < n]
        for _, d in ready:
            d.callback(None)


class SinkProtocol(Protocol):
    def __init__(self, factory: SinkFactory) -> None:
        self.f = factory
        self.buf = b""
        self.mode = "command"
        self.helo: bytes | None = None
        self.tls = False
        self.user: bytes | None = None
        self.txn: Transaction | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.auth_state: tuple[bytes, bytes | None] | None = None
        self.closed = False

    def connectionMade(self) -> None:
        self.send(self.f.script.pop(b"GREETING", [b"220 sink.test ESMTP\r\n"])[0]
                  if self.f.script.get(b"GREETING") else b"220 sink.test ESMTP\r\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while not self.closed:
            if self.mode == "data":
                drop = self.f.drop_in_data_after
                if drop is not None and self.body_size + len(self.buf) >= drop:
                    self.transport.abortConnection()  # type: ignore[union-attr]
                    self.closed = True
                    return
                end = self.buf.find(b"\r\n.\r\n")
                if self.body_size == 0 and self.buf.startswith(b".\r\n"):
                    end = -2
                if end == -1:
                    keep = len(self.buf) - 4
                    if keep > 0:
                        self.body.append(self.buf[:keep])
                        self.body_size += keep
                        self.buf = self.buf[keep:]
                    return
                self.body.append(self.buf[: end + 2])
                self.buf = self.buf[end + 5 :]
                self.mode = "command"
                self.end_of_data(b"".join(self.body))
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                return
            line, self.buf = self.buf[:nl].rstrip(b"\r"), self.buf[nl + 1 :]
            if self.mode == "auth":
                self.auth_line(line)
            else:
                self.command(line)

    def command(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        self.f.commands.append(line if verb != b"AUTH" else b"AUTH ***")
        if verb in self.f.hang:
            return
        if self.f.hook is not None:
            reply = self.f.hook(self, verb, line)
            if reply is not None:
                self.send(reply)
                self.after(verb, line, reply)
                return
        queue = self.f.script.get(verb)
        if queue:
            reply = queue.pop(0)
            self.send(reply)
            self.after(verb, line, reply)
            return
        handler = getattr(self, f"do_{verb.decode('ascii', 'replace')}", None)
        if handler is None:
            self.send(b"500 5.5.2 unknown command\r\n")
        else:
            handler(line)

    def after(self, verb: bytes, line: bytes, reply: bytes) -> None:
        """Keep the state right when a scripted reply was sent instead of ours."""
        ok = reply[:1] in b"23"
        if verb == b"MAIL" and ok:
            self.txn = Transaction(self.helo or b"", line, tls=self.tls, user=self.user)
        elif verb == b"RCPT" and ok and self.txn is not None:
            self.txn.rcpts.append(line)
        elif verb == b"DATA" and reply.startswith(b"354"):
            self.start_data()
        elif verb in (b"EHLO", b"HELO") and ok:
            self.helo = line[5:].strip()
        elif verb == b"QUIT":
            self.transport.loseConnection()  # type: ignore[union-attr]

    def do_EHLO(self, line: bytes) -> None:
        self.helo, self.txn = line[5:].strip(), None
        ext = list(self.f.extensions)
        if self.f.tls is not None and not self.tls:
            ext.append(b"STARTTLS")
        if self.f.users:
            ext.append(b"AUTH PLAIN LOGIN")
        lines = [self.f.hostname, *ext]
        self.send(b"".join(b"250%s%s\r\n" % (b" " if i == len(lines) - 1 else b"-", text)
                           for i, text in enumerate(lines)))

    def do_HELO(self, line: bytes) -> None:
        self.helo, self.txn = line[5:].strip(), None
        self.send(b"250 " + self.f.hostname + b"\r\n")

    def do_MAIL(self, line: bytes) -> None:
        if self.helo is None:
            self.send(b"503 5.5.1 EHLO first\r\n")
        elif self.txn is not None:
            self.send(b"503 5.5.1 nested MAIL\r\n")
        else:
            self.txn = Transaction(self.helo, line, tls=self.tls, user=self.user)
            self.send(b"250 2.1.0 Ok\r\n")

    def do_RCPT(self, line: bytes) -> None:
        if self.txn is None:
            self.send(b"503 5.5.1 need MAIL\r\n")
        else:
            self.txn.rcpts.append(line)
            self.send(b"250 2.1.5 Ok\r\n")

    def do_DATA(self, line: bytes) -> None:
        if self.txn is None or not self.txn.rcpts:
            self.send(b"554 5.5.1 no valid recipients\r\n")
        else:
            self.start_data()
            self.send(b"354 go ahead\r\n")

    def start_data(self) -> None:
        self.mode, self.body, self.body_size = "data", [], 0

    def end_of_data(self, stuffed: bytes) -> None:
        data = (b"\r\n" + stuffed).replace(b"\r\n..", b"\r\n.")[2:]
        txn, self.txn = self.txn, None
        reply = self.f.script.get(b"END-OF-DATA")
        if reply:
            self.send(reply.pop(0))
            return
        assert txn is not None
        txn.data = data
        self.f.delivered_one(txn)
        self.send(b"250 2.0.0 Ok: queued as %d\r\n" % self.f.delivered)

    def do_RSET(self, line: bytes) -> None:
        self.txn = None
        self.send(b"250 2.0.0 Ok\r\n")

    def do_NOOP(self, line: bytes) -> None:
        self.send(b"250 2.0.0 Ok\r\n")

    def do_QUIT(self, line: bytes) -> None:
        self.send(b"221 2.0.0 Bye\r\n")
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.closed = True

    def do_STARTTLS(self, line: bytes) -> None:
        if self.f.tls is None or self.tls:
            self.send(b"502 5.5.1 no\r\n")
            return
        self.send(b"220 2.0.0 Ready\r\n")
        self.buf = b""
        self.transport.startTLS(self.f.tls)  # type: ignore[union-attr]
        self.tls, self.helo, self.txn = True, None, None

    def do_AUTH(self, line: bytes) -> None:
        parts = line.split()
        mech = parts[1].upper() if len(parts) > 1 else b""
        if not self.f.users or mech not in (b"PLAIN", b"LOGIN"):
            self.send(b"504 5.5.4 mechanism not supported\r\n")
        elif mech == b"PLAIN" and len(parts) > 2:
            self.check_plain(parts[2])
        elif mech == b"PLAIN":
            self.mode, self.auth_state = "auth", (b"PLAIN", None)
            self.send(b"334 \r\n")
        else:
            self.mode, self.auth_state = "auth", (b"LOGIN", None)
            self.send(b"334 VXNlcm5hbWU6\r\n")

    def auth_line(self, line: bytes) -> None:
        assert self.auth_state is not None
        mech, user = self.auth_state
        self.mode = "command"
        if line == b"*":
            self.send(b"501 5.7.0 cancelled\r\n")
        elif mech == b"PLAIN":
            self.check_plain(line)
        elif user is None:
            self.mode, self.auth_state = "auth", (b"LOGIN", base64.b64decode(line))
            self.send(b"334 UGFzc3dvcmQ6\r\n")
        else:
            self.finish_auth(user, base64.b64decode(line))

    def check_plain(self, blob: bytes) -> None:
        try:
            _, user, password = base64.b64decode(blob).split(b"\0")
        except ValueError:
            self.send(b"501 5.5.2 bad PLAIN\r\n")
            return
        self.finish_auth(user, password)

    def finish_auth(self, user: bytes, password: bytes) -> None:
        if self.f.users.get(user) == password:
            self.user = user
            self.send(b"235 2.7.0 Authentication successful\r\n")
        else:
            self.send(b"535 5.7.8 Authentication credentials invalid\r\n")


# -- test certificates ---------------------------------------------------------------------


def make_certificate(directory: str | Path, name: str = "localhost") -> tuple[str, str]:
    """A self-signed certificate for ``name`` and 127.0.0.1; (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def server_tls(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    pem = Path(cert_path).read_bytes() + Path(key_path).read_bytes()
    return ssl.PrivateCertificate.loadPEM(pem).options()


def main(argv: list[str]) -> None:
    """Run a non-recording sink on 127.0.0.1:PORT until killed."""
    from twisted.internet import reactor

    port = int(argv[1])
    factory = SinkFactory(record=False)
    reactor.listenTCP(port, factory, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    print("sink listening", port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
