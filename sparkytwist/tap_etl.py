# -*- test-case-name: tests.test_tap -*-
"""``twistd -n --pidfile= etl``: the accounting reader alone, as PowerMTA's pipe target."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from sparkytwist.service import ProgramService
from sparkytwist.tap import SettingsOptions, build_core

_log = Logger()


class Options(SettingsOptions):
    """twistd etl: read PMTA accounting CSV from stdin (or --file) into Redis."""

    command = "etl"
    optParameters = [
        ["file", "f", None, "load this accounting file once (back-fill), then exit"],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self.settings.accounting_enabled:
            raise usage.UsageError("the accounting reader is switched off in the settings")


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    top = ProgramService("etl")
    # No admin port: etl runs beside sparkytrack on the same host and would clash.
    build_core(options.settings, reactor, top, admin=False)
    _log.warn("etl: the accounting reader is not available in this version")
    return top
