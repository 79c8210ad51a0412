# -*- test-case-name: tests.test_smtp_integration -*-
"""``make_service`` for the wrapper part: settings -> a listening ESMTP proxy."""

from __future__ import annotations

import socket

from twisted.application.service import IService

from sparkytwist.config import Settings
from sparkytwist.service import Context
from sparkytwist.smtp import tls
from sparkytwist.smtp.server import ProxyConfig, WrapperFactory
from sparkytwist.smtp.stats import WrapperStats
from sparkytwist.workers import listen_with_workers


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


def make_service(ctx: Context) -> IService | str:
    config = proxy_config(ctx.settings)
    if isinstance(config, str):
        return config
    factory = WrapperFactory(config, ctx.codec, WrapperStats(ctx.metrics), ctx.reactor)
    return listen_with_workers(ctx, "wrapper", ctx.settings.wrapper_endpoint, factory,
                               ctx.settings.wrapper_workers)
