# -*- test-case-name: tests.test_tracker_service -*-
"""One extra tracker process: ``python -m sparkytwist.tracker.worker``.

Started by the main process when ``tracker_workers`` > 1, with every setting in the
environment. It runs only the tracker (no admin port, no embedded Redis: it uses
the main process's), listens with SO_REUSEPORT on the shared port, logs to stdout
(the main process relays the lines), and stops on SIGTERM or when its stdin (a
pipe from the main process) closes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IReadDescriptor)
class ParentWatch:
    """Stops the reactor when the main process's end of our stdin goes away."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Any:
        from twisted.internet import main

        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        if self._reactor.running:
            self._reactor.stop()

    def logPrefix(self) -> str:
        return "main-process-watch"


def main() -> None:
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])

    from twisted.internet import reactor

    from sparkytwist.config import ConfigError, load_settings
    from sparkytwist.service import ProgramService
    from sparkytwist.tap import build_core
    from sparkytwist.tracker.service import build_tracker

    try:
        settings = load_settings(None, os.environ)
    except ConfigError as e:
        raise SystemExit(f"tracker worker: {e}") from None
    top = ProgramService("tracker worker")
    ctx = build_core(settings, reactor, top, admin=False)
    build_tracker(ctx, reuse_port=True, workers=0).setServiceParent(top)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    os.set_blocking(0, False)
    reactor.addReader(ParentWatch(reactor))
    reactor.run()


if __name__ == "__main__":
    main()
