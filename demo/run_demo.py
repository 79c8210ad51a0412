"""``make demo``: the whole pipeline, visibly, in well under a minute.

The same flow as tests/test_end_to_end.py, printed step by step: a message goes
through the wrapper (rewritten links and pixels highlighted), PMTA's accounting
line goes through ``twistd etl``, mail clients fetch the pixels and follow the
links, and the feeder's NDJSON arrives at a stand-in for the SparkPost Ingest API.
Everything runs on loopback; nothing leaves the machine.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, task, threads

from tests.support.pipeline import (
    ACCOUNTING,
    ANDROID_CHROME_UA,
    DESKTOP_CHROME_UA,
    GMAIL_PROXY_UA,
    IPHONE_MAIL_UA,
    RCPT,
    SENDER,
    Pipeline,
    scenario_message,
)

COLOUR = sys.stdout.isatty()


def paint(text: str, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if COLOUR else text


def step(title: str) -> None:
    print()
    print(paint(f"== {title} ", "1;36") + paint("=" * max(0, 70 - len(title)), "36"))


def short(url: str) -> str:
    return url if len(url) < 70 else url[:44] + "…" + url[-20:]


async def demo(reactor: Any) -> None:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    cleanups: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    pipeline = Pipeline(lambda f, *a, **kw: cleanups.append((f, a, kw)))
    try:
        step("1. start twistd -n sparkytrack (embedded Redis, wrapper, tracker, feeder)")
        await pipeline.start(http)
        print(f"wrapper  smtp://127.0.0.1:{pipeline.ports['wrapper']}   "
              f"tracker {pipeline.base_url}   admin http://127.0.0.1:{pipeline.ports['admin']}")

        step("2. the generator sends a newsletter through the wrapper (smtplib)")
        await threads.deferToThread(pipeline.send, SENDER, [RCPT], scenario_message())
        relayed = email.message_from_bytes(pipeline.sink.transactions[0].data,
                                           policy=email.policy.default)
        message_id = relayed["X-Sp-Message-Id"]
        print(f"upstream (PMTA stand-in) received it; X-Sp-Message-Id: {paint(message_id, '1')}")
        html = relayed.get_body(("html",)).get_content()  # type: ignore[union-attr]
        tracking_url = re.escape(pipeline.base_url) + "/[A-Za-z0-9_-]+"
        print(re.sub(tracking_url, lambda m: paint(short(m.group(0)), "1;33"), html))
        urls: dict[str, list[str]] = {}
        for url in re.findall(rf"""(?:href|src)=["']?({tracking_url})""", html):
            tracking = pipeline.codec.decode(url.rsplit("/", 1)[1])
            urls.setdefault(tracking.action, []).append(url)
            kind = "honeypot (hidden)" if tracking.action == "h" else tracking.event_type
            print(f"  {paint(kind, '33'):>28}  {tracking.url or ''}")

        step("3. PMTA logs the delivery; its accounting pipe runs twistd -n etl")
        lines = ACCOUNTING.format(rcpt=RCPT, msg=message_id)
        print(lines.strip())
        result = pipeline.run_etl(lines)
        print(f"twistd etl exited {result.returncode}")

        step("4. the recipient opens the mail and clicks both links")
        hits = [(urls["i"][0], GMAIL_PROXY_UA), (urls["o"][0], IPHONE_MAIL_UA),
                (urls["c"][0], DESKTOP_CHROME_UA), (urls["c"][1], ANDROID_CHROME_UA)]
        for url, agent in hits:
            response = await http.get(url, headers={"User-Agent": agent},
                                      allow_redirects=False)
            body = await response.content()
            where = (response.headers.getRawHeaders("location") or [""])[0]
            what = f"-> {where}" if where else f"{len(body)}-byte GIF"
            print(f"GET {short(url)}\n    {agent[:60]}…\n    "
                  f"{paint(str(response.code), '1;32')} {what}")

        step("5. the feeder posts gzipped NDJSON to the Ingest API")
        events = await pipeline.ingest.wait_for_events(4, timeout=30)
        for batch in pipeline.ingest.batches:
            print(f"POST /api/v1/ingest/events: {len(batch.lines)} events, "
                  f"{batch.raw_size} bytes NDJSON, {batch.compressed_size} gzipped "
                  f"-> 200, batch id {batch.id}")
        for event in events:
            print(paint(json.dumps({"msys": {"track_event": event}}, ensure_ascii=False),
                        "32"))
    finally:
        for f, a, kw in reversed(cleanups):
            try:
                outcome = f(*a, **kw)
                if isinstance(outcome, defer.Deferred):
                    await outcome
            except Exception as e:  # keep cleaning up
                print(f"cleanup: {e}", file=sys.stderr)
        await pool.closeCachedConnections()


def main() -> None:
    task.react(lambda reactor: defer.ensureDeferred(demo(reactor)))


if __name__ == "__main__":
    main()
