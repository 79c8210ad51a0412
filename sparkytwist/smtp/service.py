# -*- test-case-name: tests.test_smtp_integration -*-
"""``make_service`` for the wrapper part: settings -> a listening ESMTP proxy."""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from sparkytwist.config import Settings
from sparkytwist.service import Context
from sparkytwist.smtp import tls, upstream
from sparkytwist.smtp.server import ProxyConfig, WrapperFactory
from sparkytwist.smtp.stats import WrapperStats
from sparkytwist.workers import listen_with_workers

_log = Logger()


def proxy_config(settings: Settings) -> ProxyConfig | str:
    """The proxy's configuration, or why the settings cannot make one."""
    server_tls = None
    if bool(settings.tls_cert) != bool(settings.tls_key):
        return "tls_cert and tls_key must be set together"
    if settings.tls_cert:
        try:
            server_tls = tls.server_options(settings.tls_cert, settings.tls_key)
        except tls.TLSConfigError as e:
            return str(e)
    host, _, port = settings.upstream.rpartition(":")
    host = host.strip("[]")
    upstream_tls_options = None
    if settings.upstream_tls != "off":
        upstream_tls_options = tls.client_options(host, verify=settings.upstream_tls_verify)
    return ProxyConfig(
        hostname=settings.hostname or socket.gethostname(),
        upstream_host=host,
        upstream_port=int(port),
        tracking_base_url=settings.tracking_base_url,
        upstream_tls=settings.upstream_tls,
        upstream_tls_options=upstream_tls_options,
        server_tls=server_tls,
        auth_passthrough=settings.auth_passthrough,
        allow_plain_auth=settings.allow_plain_auth,
        max_message_size=settings.max_message_size,
        max_line_length=settings.max_line_length,
        max_connections=settings.max_connections,
        idle_timeout=settings.idle_timeout,
        upstream_timeout=settings.upstream_timeout,
    )


class UpstreamProbe(Service):
    """Says at start-up whether the upstream MTA answers, so a missing PMTA is obvious.

    The wrapper runs either way: clients get 421 until the upstream answers.
    """

    name = "upstream-probe"

    def __init__(self, config: ProxyConfig, reactor: Any) -> None:
        self._config = config
        self._reactor = reactor
        self._attempt: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._attempt = defer.Deferred.fromCoroutine(self._probe())

    async def _probe(self) -> None:
        where = f"{self._config.upstream_host}:{self._config.upstream_port}"
        try:
            client = await upstream.connect(self._reactor, self._config.upstream_host,
                                            self._config.upstream_port, timeout=5)
        except Exception as e:
            _log.warn("wrapper: the upstream MTA at {where} does not answer ({reason}); "
                      "clients get 421 until it does (set upstream)",
                      where=where, reason=str(e) or e.__class__.__name__)
            return
        client.quit()
        _log.info("wrapper: the upstream MTA at {where} answers", where=where)

    def stopService(self) -> None:
        super().stopService()
        if self._attempt is not None and not self._attempt.called:
            self._attempt.cancel()


def make_service(ctx: Context) -> IService | str:
    config = proxy_config(ctx.settings)
    if isinstance(config, str):
        return config
    factory = WrapperFactory(config, ctx.codec, WrapperStats(ctx.metrics), ctx.reactor)
    listener = listen_with_workers(ctx, "wrapper", ctx.settings.wrapper_endpoint, factory,
                                   ctx.settings.wrapper_workers)
    if ctx.worker:
        return listener
    top = MultiService()
    top.setName("wrapper")
    listener.setServiceParent(top)
    UpstreamProbe(config, ctx.reactor).setServiceParent(top)
    return top
