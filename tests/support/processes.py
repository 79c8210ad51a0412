"""Running our own commands (twistd, sparkytwist) as real subprocesses in tests."""

from __future__ import annotations

import os
import socket
import sys

from sparkytwist.embedded import free_loopback_port


def venv_script(name: str) -> str:
    """A console script installed beside the running interpreter (twistd, sparkytwist)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def twistd(*args: str) -> list[str]:
    return [venv_script("twistd"), "-n", "--pidfile=", *args]


def free_port_pair() -> int:
    """A free loopback port whose next port is free too (the main and one worker)."""
    for _ in range(100):
        port = free_loopback_port()
        with socket.socket() as probe:
            # as Twisted listens: a TIME_WAIT on the port (common for odd ports, which
            # Linux gives to outgoing connections) does not make it busy
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row")
