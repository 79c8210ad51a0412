# -*- test-case-name: tests.test_accounting_service -*-
"""``twistd -n --pidfile= etl``: the accounting reader alone, as PowerMTA's pipe target.

It reads stdin until EOF (or ``--file`` once, for back-fills), writes every
delivery fact to Redis and then stops the reactor: exit status 0 means nothing read
was lost. While Redis is down it stops reading (PowerMTA's pipe fills and PMTA
waits); at EOF with Redis still down it keeps retrying until it gets SIGTERM.
"""

from __future__ import annotations

import dataclasses
import os

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from sparkytwist.config import Settings
from sparkytwist.embedded import EmbeddedRedisError, running_redis_url
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
        path = self["file"]
        if path is not None and not os.access(path, os.R_OK):
            raise SystemExit(f"etl: cannot read --file {path}")


def etl_settings(options: Options) -> Settings:
    """The settings the etl runs with.

    No token key is needed (the etl makes and reads no links), so an unset
    ``token_keys`` gets a throwaway key instead of creating ``var/token_keys`` in
    whatever directory PowerMTA starts us in. Without ``redis_url`` the etl uses
    the embedded server sparkytrack runs (its socket in ``redis_data_dir``), never
    a second server of its own.
    """
    from sparkytwist.token import new_key_spec

    settings = options.settings
    if not settings.token_keys:
        settings = dataclasses.replace(settings, token_keys=(new_key_spec(),))
    if not settings.redis_url and not settings.redis_sentinels:
        try:
            url = running_redis_url(settings.redis_data_dir)
        except EmbeddedRedisError as e:
            raise SystemExit(f"etl: {e}") from None
        settings = dataclasses.replace(settings, redis_url=url)
    return settings


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from sparkytwist.accounting.service import EtlService

    top = ProgramService("etl")
    # No admin port: etl runs beside sparkytrack on the same host and would clash.
    ctx = build_core(etl_settings(options), reactor, top, admin=False)

    def done() -> None:
        if reactor.running:
            reactor.stop()

    EtlService(ctx, path=options["file"], on_done=done).setServiceParent(top)
    return top
