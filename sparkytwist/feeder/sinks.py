# -*- test-case-name: tests.test_feeder_sinks -*-
"""Where a finished batch goes, and what its answer means for the batch.

Every sink takes the same gzip NDJSON body and answers with one of three outcomes:
:class:`Delivered` (acknowledge the entries), :class:`Retry` (keep them pending and
try again later) or :class:`Rejected` (the receiver will never take this batch: dead
letter it). Only the HTTP status decides; the classification is the same for the
SparkPost Ingest API and a webhook.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from twisted.internet import defer, error, threads
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed

from sparkytwist.events import INGEST_CONTENT_TYPE, INGEST_PATH

_log = Logger()

#: The longest Retry-After we obey; a bigger one is read as this (we ask again then).
MAX_RETRY_AFTER = 3600.0
#: Default overall limit for one upload: connect, send, and read the answer.
REQUEST_TIMEOUT = 60.0
SIGNATURE_HEADER = "X-Sparkytwist-Signature"


@dataclass(frozen=True)
class EncodedBatch:
    """One request body: gzip of NDJSON lines, and what the logs say about it."""

    body: bytes
    raw_bytes: int
    events: int
    first_id: bytes
    last_id: bytes


@dataclass(frozen=True)
class Delivered:
    status: int
    detail: str  #: SparkPost's batch id, the file name, or the webhook's answer


@dataclass(frozen=True)
class Retry:
    reason: str
    status: int = 0  #: 0 = no HTTP answer (connection error, timeout)
    retry_after: float | None = None


@dataclass(frozen=True)
class Rejected:
    status: int
    body: str
    pause: bool  #: the credentials were refused: stop before burning more batches


Outcome = Delivered | Retry | Rejected


class Sink(Protocol):
    name: str

    def deliver(self, batch: EncodedBatch) -> defer.Deferred[Outcome]:
        """Send one batch; never errbacks except with CancelledError (stopping)."""

    def close(self) -> defer.Deferred[None] | None: ...


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


def classify(
    status: int, headers: Mapping[str, str], body: bytes, now: float, *, any_2xx: bool = False
) -> Outcome:
    """The outcome of an HTTP answer (see docs/feeder.md, "What each answer does").

    SparkPost promises 200 for an accepted batch; a webhook may answer any 2xx.
    """
    text = body[:2000].decode("utf-8", "replace")
    if status == 200 or (any_2xx and 200 <= status < 300):
        return Delivered(status, _batch_id(body) or text[:200])
    if status in (408, 429) or status >= 500:
        return Retry(f"HTTP {status}", status,
                     retry_after_seconds(headers.get("retry-after"), now))
    if status in (401, 403):
        return Rejected(status, text, pause=True)
    if 400 <= status < 500:
        return Rejected(status, text, pause=False)
    # 1xx/2xx/3xx we did not expect: a proxy or a wrong URL; keep the events and
    # let the operator see it in the log.
    return Retry(f"unexpected HTTP {status}", status)


def _batch_id(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        return str(parsed["results"]["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def ingest_url(host_setting: str) -> str:
    """The Ingest endpoint for ``sparkpost_host``: a host name, or a base URL.

    ``api.eu.sparkpost.com`` → ``https://api.eu.sparkpost.com/api/v1/ingest/events``;
    a value with a scheme (``http://127.0.0.1:8999``, ``https://proxy:8443/sp``) is used
    as the base as given, path prefix included.
    """
    value = host_setting.strip()
    if not value:
        raise ValueError("sparkpost_host is empty")
    if "://" not in value:
        value = "https://" + value
    value = value.rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"sparkpost_host: expected a host name or http(s) URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"sparkpost_host: no query or fragment allowed in {value!r}")
    return value + INGEST_PATH


_NETWORK_ERRORS = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionClosed,
    error.DNSLookupError,
    ResponseFailed,
    OSError,
)


class HTTPSink:
    """POST the gzip NDJSON body to a URL with treq (the client is passed in)."""

    name = "http"
    any_2xx = True

    def __init__(
        self,
        http: Any,
        url: str,
        clock: IReactorTime,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._http = http
        self.url = url
        self._clock = clock
        self._headers = {
            "Content-Type": INGEST_CONTENT_TYPE,
            "Content-Encoding": "gzip",
            "User-Agent": "sparkytwist-feeder",
            **(headers or {}),
        }
        self.timeout = timeout

    def headers_for(self, batch: EncodedBatch) -> dict[str, str]:
        return dict(self._headers)

    def deliver(self, batch: EncodedBatch) -> defer.Deferred[Outcome]:
        d = defer.Deferred.fromCoroutine(self._post(batch))
        d.addTimeout(self.timeout, self._clock)
        d.addErrback(self._failed)
        return d

    async def _post(self, batch: EncodedBatch) -> Outcome:
        response = await self._http.request(
            "POST", self.url, data=batch.body, headers=self.headers_for(batch),
            allow_redirects=False)
        body = await response.content()
        headers = {
            k.decode("latin-1").lower(): vs[0].decode("latin-1")
            for k, vs in response.headers.getAllRawHeaders()
        }
        return classify(response.code, headers, body, self._clock.seconds(),
                        any_2xx=self.any_2xx)

    def _failed(self, failure: Any) -> Outcome:
        if failure.check(defer.TimeoutError):
            return Retry(f"no answer within {self.timeout:g}s")
        if failure.check(defer.CancelledError):
            failure.raiseException()
        if failure.check(*_NETWORK_ERRORS):
            return Retry(_describe_failure(failure.value))
        _log.failure("feeder: unexpected error sending a batch to {url}", failure, url=self.url)
        return Retry(f"unexpected error: {failure.value!r}")

    def close(self) -> defer.Deferred[None] | None:
        return None


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, ResponseFailed) and exc.reasons:
        return "; ".join(str(r.value) or type(r.value).__name__ for r in exc.reasons)
    return str(exc) or type(exc).__name__


class SparkPostSink(HTTPSink):
    """The SparkPost Ingest API; the key goes in ``Authorization`` as is."""

    name = "sparkpost"
    any_2xx = False

    def __init__(
        self, http: Any, host_setting: str, api_key: str, clock: IReactorTime,
        *, timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(http, ingest_url(host_setting), clock,
                         headers={"Authorization": api_key}, timeout=timeout)


class WebhookSink(HTTPSink):
    """Any HTTP endpoint; with a secret, ``X-Sparkytwist-Signature: sha256=<hex>``.

    The signature is HMAC-SHA256 over the request body exactly as sent (the gzip
    bytes), so a receiver checks it before inflating anything.
    """

    name = "webhook"

    def __init__(
        self, http: Any, url: str, secret: str, clock: IReactorTime,
        *, timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(http, url, clock, timeout=timeout)
        self._secret = secret.encode()

    def headers_for(self, batch: EncodedBatch) -> dict[str, str]:
        headers = super().headers_for(batch)
        if self._secret:
            headers[SIGNATURE_HEADER] = "sha256=" + sign(self._secret, batch.body)
        return headers


def sign(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def batch_file_name(batch: EncodedBatch) -> str:
    """``events-<first id>_<last id>.ndjson.gz``: sorts by time, names its entries."""
    return f"events-{batch.first_id.decode()}_{batch.last_id.decode()}.ndjson.gz"


class FileSink:
    """Each batch as one gzip NDJSON file in ``directory``, written atomically.

    Temp file, fsync, rename, fsync of the directory: a reader never sees half a
    file, and a batch acknowledged after a crash is on disk. Written in a thread
    (fsync can take long). A failure (disk full) is retried like a 5xx.
    """

    name = "file"

    def __init__(self, directory: str, reactor: IReactorThreads) -> None:
        self.directory = directory
        self._reactor = reactor

    def deliver(self, batch: EncodedBatch) -> defer.Deferred[Outcome]:
        d = threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._write, batch)
        d.addErrback(lambda f: Retry(f"cannot write in {self.directory}: {f.value}"))
        return d

    def _write(self, batch: EncodedBatch) -> Outcome:
        os.makedirs(self.directory, exist_ok=True)
        name = batch_file_name(batch)
        final = os.path.join(self.directory, name)
        temp = os.path.join(self.directory, f".{name}.{os.getpid()}.tmp")
        try:
            with open(temp, "wb") as f:
                f.write(batch.body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return Delivered(200, name)

    def close(self) -> defer.Deferred[None] | None:
        return None
