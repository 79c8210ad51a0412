"""Running our own commands (twistd, sparkytwist) as real subprocesses in tests."""

from __future__ import annotations

import os
import sys


def venv_script(name: str) -> str:
    """A console script installed beside the running interpreter (twistd, sparkytwist)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def twistd(*args: str) -> list[str]:
    return [venv_script("twistd"), "-n", "--pidfile=", *args]

