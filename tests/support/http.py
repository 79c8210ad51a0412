"""Small blocking HTTP helpers for tests that drive real subprocesses."""

from __future__ import annotations

import time
import urllib.error
import urllib.request


def get_status(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e).encode()


def wait_for_status(url: str, status: int, timeout: float) -> tuple[int, bytes]:
    """Poll until ``url`` answers ``status``; the last answer once ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        answer = get_status(url)
        if answer[0] == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def http_client(test: object) -> object:
    """A treq HTTPClient without kept-alive connections, closed in the test's cleanup.

    treq's default pool keeps connections open past the test, which trial reports
    as a dirty reactor.
    """
    from treq.client import HTTPClient
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)  # type: ignore[attr-defined]
    return HTTPClient(Agent(reactor, pool=pool))
