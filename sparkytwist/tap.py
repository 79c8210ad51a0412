# -*- test-case-name: tests.test_tap -*-
"""``twistd sparkytrack``: options from the settings declaration, and the service tree.

Nothing here imports the reactor or txredisapi at import time: twistd imports this
module to show ``--help`` before it has installed a reactor.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from sparkytwist.config import PARTS, ConfigError, Settings, describe, format_default, load_settings
from sparkytwist.embedded import EmbeddedRedisService, RedisServer
from sparkytwist.listen import ListeningService
from sparkytwist.metrics import Metrics
from sparkytwist.redis import Redis
from sparkytwist.service import (
    Context,
    OrderedService,
    ProgramService,
    RedisConnectionService,
)
from sparkytwist.store import Keys
from sparkytwist.token import TokenCodec, load_or_create_key_file

_log = Logger()

#: Where each part's factory lives: ``make_service(ctx) -> IService | str`` (a str is
#: the reason the part cannot run with these settings). Imported only when enabled.
PART_FACTORIES: Mapping[str, str] = MappingProxyType({
    "tracker": "sparkytwist.tracker.service:make_service",
    "feeder": "sparkytwist.feeder.service:make_service",
    "wrapper": "sparkytwist.smtp.service:make_service",
    "accounting": "sparkytwist.accounting.service:make_service",
})


def settings_parameters() -> list[list[Any]]:
    """One ``--option`` per setting, with its default in the help text.

    The usage default stays None so that only options really given on the command
    line override the ini file and the environment.
    """
    params: list[list[Any]] = [["config", "c", None, "ini file with settings (see etc/)"]]
    for info in describe():
        shown = "***" if info.secret and info.default else format_default(info.default)
        params.append([info.option, None, None, f"{info.help} [default: {shown or '(empty)'}]"])
    return params


class SettingsOptions(usage.Options):
    """Options that build :class:`Settings`; a bad one exits with a single line."""

    optParameters = settings_parameters()
    command = "sparkytwist"
    settings: Settings

    def cli_values(self) -> dict[str, str]:
        names = {info.option: info.name for info in describe()}
        return {names[k]: v for k, v in self.items() if k in names and v is not None}

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self["config"], os.environ, self.cli_values())
        except ConfigError as e:
            raise SystemExit(f"{self.command}: {e}") from None


class Options(SettingsOptions):
    """twistd sparkytrack: the wrapper, tracker, accounting reader and feeder together."""

    command = "sparkytrack"
    optFlags = [[f"no-{part}", None, f"do not run the {part}"] for part in PARTS]

    def cli_values(self) -> dict[str, str]:
        values = super().cli_values()
        for part in PARTS:
            if self[f"no-{part}"]:
                values[f"{part}_enabled"] = "false"
        return values


def token_codec(settings: Settings) -> TokenCodec:
    specs = settings.token_keys
    if not specs:
        specs = load_or_create_key_file(settings.token_key_file)
        _log.warn(
            "token_keys is not set: using the key in {path}. Every host that makes or "
            "reads links must share it: set token_keys in production.",
            path=settings.token_key_file)
    return TokenCodec.from_specs(specs, accept_legacy=settings.accept_legacy_tokens)


def build_core(
    settings: Settings, reactor: Any, top: OrderedService, *, admin: bool = True,
    worker: bool = False,
) -> Context:
    """Embedded Redis (if no URL), the Redis connection and the admin port, added to top."""
    url = settings.redis_url
    if not url and not settings.redis_sentinels:
        embedded = EmbeddedRedisService(
            RedisServer(settings.redis_data_dir, binary=settings.redis_server))
        embedded.setServiceParent(top)
        url = embedded.server.url
    redis = Redis(timeout=settings.redis_timeout, clock=reactor, url=url,
                  sentinels=settings.redis_sentinels, master=settings.redis_master,
                  password=settings.redis_password)
    RedisConnectionService(redis).setServiceParent(top)
    ctx = Context(settings=settings, reactor=reactor, redis=redis, metrics=Metrics(),
                  keys=Keys(settings.redis_prefix), codec=token_codec(settings), worker=worker)
    if admin and settings.admin_enabled:
        from sparkytwist.admin import admin_site

        # A worker's /metrics is a convenience: a busy port must not stop the worker.
        ListeningService("admin", settings.admin_endpoint, admin_site(ctx.metrics, redis),
                         reactor, required=not worker).setServiceParent(top)
    return ctx


def build_part(part: str, ctx: Context) -> IService | None:
    """The part's service, or None after saying why it does not run."""
    if not ctx.settings.enabled(part):
        _log.info("{part}: switched off", part=part)
        return None
    factory_path = PART_FACTORIES.get(part)
    if factory_path is None:
        _log.warn("{part}: not available in this version", part=part)
        return None
    module, _, function = factory_path.partition(":")
    made = getattr(importlib.import_module(module), function)(ctx)
    if isinstance(made, str):
        _log.warn("{part}: not started: {reason}", part=part, reason=made)
        return None
    assert IService.providedBy(made)
    return made


def build_service(settings: Settings, reactor: Any) -> OrderedService:
    top = ProgramService("sparkytrack")
    ctx = build_core(settings, reactor, top)
    running = []
    for part in PARTS:
        service = build_part(part, ctx)
        if service is not None:
            service.setServiceParent(top)
            running.append(part)
    _log.info("sparkytrack: running {parts}", parts=", ".join(running) or "no parts")
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(options.settings, reactor)
