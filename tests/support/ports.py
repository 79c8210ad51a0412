"""Loopback ports for servers a test starts and must name before they listen.

``bind(port 0)`` and close is racy when tests run in parallel (trial -j): the
kernel hands the same ephemeral ports to every process, to outgoing connections
too. These ports come from below the ephemeral range instead, where the kernel
never assigns on its own, from a block picked by this process's pid and a
counter, each probed as Twisted will bind it (SO_REUSEADDR). Two test processes
only meet if their pids share a block and their counters meet there too.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

#: Below Linux's default ephemeral range (32768-60999).
FIRST, LAST = 20000, 32000
BLOCK = 500

_next = itertools.count()  # per process: the point of it


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(span: int = 1) -> int:
    """A port ``p`` such that ``p .. p + span - 1`` are all free on 127.0.0.1."""
    blocks = (LAST - FIRST) // BLOCK
    base = FIRST + (os.getpid() % blocks) * BLOCK
    for _ in range(BLOCK):
        port = base + (next(_next) * span) % (BLOCK - span)
        if all(_bindable(port + i) for i in range(span)):
            return port
    raise RuntimeError("no free loopback port in this process's block")


def wait_for_port(port: int, timeout: float) -> None:
    """Until something accepts connections on 127.0.0.1:``port``; TimeoutError after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")
