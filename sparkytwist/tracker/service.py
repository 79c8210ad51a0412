# -*- test-case-name: tests.test_tracker_service -*-
"""The tracker part: the recorder and the listening site (with tracker_workers > 1,
also the worker processes sharing its port: see :mod:`sparkytwist.workers`)."""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.logger import Logger

from sparkytwist.service import Context, OrderedService
from sparkytwist.tracker.bots import BotClassifier
from sparkytwist.tracker.clientip import ClientAddress
from sparkytwist.tracker.ratelimit import PerClientLimiter
from sparkytwist.tracker.recorder import EventRecorder
from sparkytwist.tracker.resource import TrackerResource, TrackerSite
from sparkytwist.workers import listen_with_workers

_log = Logger()

#: Set (to anything) in the environment: every response says which process served it
#: in ``X-Sparky-Worker`` (a debugging aid; off by default).
WORKER_HEADER_ENV = "SPARKY_TRACKER_WORKER_HEADER"


def build_site(ctx: Context, recorder: EventRecorder) -> TrackerSite:
    s = ctx.settings
    root = TrackerResource(
        ctx.codec, recorder, clock=ctx.reactor, metrics=ctx.metrics,
        client_address=ClientAddress(s.trusted_proxies), bots=BotClassifier(),
        limiter=PerClientLimiter(s.per_ip_rate, s.per_ip_burst, ctx.reactor),
        bot_events=s.bot_events, root_redirect=s.root_redirect,
        worker_header=bool(os.environ.get(WORKER_HEADER_ENV)))
    return TrackerSite(root)


def make_recorder(ctx: Context) -> EventRecorder:
    return EventRecorder(
        ctx.redis, ctx.keys, maxlen=ctx.settings.events_maxlen,
        capacity=ctx.settings.tracker_buffer, clock=ctx.reactor, metrics=ctx.metrics)


def make_service(ctx: Context) -> IService:
    """The tracker of ``twistd sparkytrack`` (and of its tracker workers)."""
    top = OrderedService()
    top.setName("tracker")
    recorder = make_recorder(ctx)
    recorder.setServiceParent(top)
    listen_with_workers(ctx, "tracker", ctx.settings.tracker_endpoint,
                        build_site(ctx, recorder), ctx.settings.tracker_workers,
                        ).setServiceParent(top)
    return top
