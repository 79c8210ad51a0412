# -*- test-case-name: tests.test_cli -*-
"""The ``sparkytwist`` command: keys, tokens, erasure, dead letters, sample config."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from sparkytwist.config import ConfigError, Settings, load_settings, sample_ini
from sparkytwist.embedded import running_redis_url
from sparkytwist.redis import Redis
from sparkytwist.store import Keys
from sparkytwist.token import (
    TokenCodec,
    TokenError,
    decode_legacy,
    load_or_create_key_file,
    new_key_spec,
)


def token_from(text: str) -> tuple[str, bool]:
    """The token in a tracking URL (or a bare token), and whether it is a legacy one."""
    text = text.strip()
    if "://" not in text:
        return text, False
    path = urlsplit(text).path
    legacy = "/tracking/open/" in path or "/tracking/click/" in path
    return path.rstrip("/").rsplit("/", 1)[-1], legacy


def _codec(config: str | None) -> TokenCodec:
    settings = load_settings(config, os.environ)
    specs = settings.token_keys
    if not specs:
        if not os.path.exists(settings.token_key_file):
            raise ConfigError("token_keys: not set, and no key file at "
                              f"{settings.token_key_file}")
        specs = load_or_create_key_file(settings.token_key_file)
    return TokenCodec.from_specs(specs, accept_legacy=True)


def decode_command(args: argparse.Namespace) -> int:
    token, legacy = token_from(args.token)
    try:
        tracking = decode_legacy(token) if legacy else _codec(args.config).decode(token)
    except TokenError as e:
        if legacy:
            print(f"not a valid legacy token: {e}", file=sys.stderr)
            return 1
        try:  # a bare legacy token pasted without its URL
            tracking = decode_legacy(token)
        except TokenError:
            print(f"not a valid token: {e}", file=sys.stderr)
            return 1
    print(json.dumps({
        "event_type": tracking.event_type,
        "action": tracking.action,
        "message_id": tracking.message_id,
        "rcpt": tracking.rcpt,
        "url": tracking.url,
    }, indent=2, ensure_ascii=False))
    return 0


def _redis_for(settings: Settings, reactor: Any) -> Redis:
    """A connection to the Redis that sparkytrack (with these settings) uses."""
    url = settings.redis_url or (
        "" if settings.redis_sentinels else running_redis_url(settings.redis_data_dir))
    redis = Redis(timeout=settings.redis_timeout * 5, clock=reactor, url=url,
                  sentinels=settings.redis_sentinels, master=settings.redis_master,
                  password=settings.redis_password)
    redis.open()
    return redis


def dead_letters_command(args: argparse.Namespace) -> NoReturn:
    from twisted.internet import defer, task

    from sparkytwist.feeder.deadletters import dead_letters, resend
    from sparkytwist.feeder.service import make_sink, missing_requirement

    settings = load_settings(args.config, os.environ)
    keys = Keys(settings.redis_prefix)
    reason = missing_requirement(settings) if args.action == "resend" else None
    if reason is not None:
        raise ConfigError(f"sink: {reason}")

    async def run(reactor: Any) -> None:
        redis = _redis_for(settings, reactor)
        try:
            if args.action == "list":
                async for letter in dead_letters(redis, keys):
                    print(f"{letter.entry_id.decode()}  {letter.events:6d} events  "
                          f"{letter.reason}")
                return
            import treq

            sink = make_sink(settings, reactor, treq)
            sent, stopped = await resend(redis, keys, sink)
            print(f"resent {sent} batch(es)" + (f"; stopped at {stopped}" if stopped else ""))
            if stopped:
                raise SystemExit(1)
        finally:
            await redis.close()

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


def erase_command(args: argparse.Namespace) -> NoReturn:
    from twisted.internet import defer, task

    from sparkytwist.erase import erase_recipient

    settings = load_settings(args.config, os.environ)

    async def run(reactor: Any) -> None:
        redis = _redis_for(settings, reactor)
        try:
            erased = await erase_recipient(redis, Keys(settings.redis_prefix), args.rcpt)
        finally:
            await redis.close()
        print(f"erased {args.rcpt}: {erased.delivery_facts} delivery fact(s), "
              f"{erased.events} queued event(s), {erased.dead_letters} dead-letter batch(es)")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparkytwist", description=__doc__)
    parser.add_argument("-c", "--config", help="ini file (as for twistd sparkytrack)")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="print a new token key as kid:base64key")
    keygen.add_argument("--kid", type=int, default=1, choices=range(256), metavar="0-255")
    token = commands.add_parser("token", help="inspect tracking tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    decode = token_commands.add_parser("decode", help="show what a token or tracking URL says")
    decode.add_argument("token", help="the token, or the whole tracking URL")
    commands.add_parser("sample-config", help="print an ini file with every setting")
    dead = commands.add_parser(
        "dead-letters", help="list the batches the sink refused for good, or resend them")
    dead.add_argument("action", choices=("list", "resend"), nargs="?", default="list")
    erase = commands.add_parser(
        "erase", help="delete a recipient's delivery facts, queued events and dead letters")
    erase.add_argument("rcpt", help="the recipient's address (case does not matter)")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            print(new_key_spec(args.kid))
            return 0
        if args.command == "sample-config":
            sys.stdout.write(sample_ini())
            return 0
        if args.command == "erase":
            return erase_command(args)
        if args.command == "dead-letters":
            return dead_letters_command(args)
        return decode_command(args)
    except ConfigError as e:
        print(f"sparkytwist: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
