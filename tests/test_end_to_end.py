"""The whole pipeline, as an operator runs it, in one test.

``twistd -n sparkytrack`` (embedded Redis, wrapper, tracker, feeder) runs as a
subprocess between an SMTP sink and a fake Ingest API, both in this process.
smtplib sends a message through the wrapper; its pixels and links are fetched
over HTTP like mail clients do; PMTA's accounting lines go through ``twistd -n
etl`` on a pipe; and the Ingest API must receive exactly the expected events,
joined with the delivery facts.
"""

from __future__ import annotations

import email
import email.policy
import re

from twisted.internet import reactor, task, threads
from twisted.trial.unittest import TestCase

from tests.support.http import http_client
from tests.support.pipeline import (
    ACCOUNTING,
    ANDROID_CHROME_UA,
    DESKTOP_CHROME_UA,
    GMAIL_PROXY_UA,
    IPHONE_MAIL_UA,
    LINK_A,
    LINK_B,
    RCPT,
    SENDER,
    Pipeline,
    scenario_message,
)


class EndToEndTests(TestCase):
    timeout = 120

    async def test_message_to_signals(self) -> None:
        pipeline = Pipeline(self.addCleanup)
        await pipeline.start(http_client(self))
        sink, ingest, codec = pipeline.sink, pipeline.ingest, pipeline.codec
        self.addCleanup(ingest.assert_clean)

        # 1. the sender's generator injects a message through the wrapper
        self.assertEqual(await threads.deferToThread(
            pipeline.send, SENDER, [RCPT], scenario_message()), {})
        self.assertEqual(len(sink.transactions), 1, pipeline.log())
        relayed = sink.transactions[0]
        self.assertEqual(relayed.rcpt_addresses, [RCPT])
        delivered = email.message_from_bytes(relayed.data, policy=email.policy.default)
        message_id = delivered["X-Sp-Message-Id"]
        self.assertRegex(message_id, r"^[0-9a-f]{20}$")
        html = delivered.get_body(("html",)).get_content()  # type: ignore[union-attr]
        self.assertIn('href="mailto:help@sender.example"', html)

        tracking_url = re.escape(pipeline.base_url) + "/[A-Za-z0-9_-]+"
        urls = re.findall(rf"""(?:href|src)=["']?({tracking_url})""", html)
        by_action: dict[str, list[str]] = {}
        for url in urls:
            tracking = codec.decode(url.rsplit("/", 1)[1])
            self.assertEqual((tracking.message_id, tracking.rcpt), (message_id, RCPT))
            by_action.setdefault(tracking.action, []).append(url)
        self.assertEqual(sorted((a, len(u)) for a, u in by_action.items()),
                         [("c", 2), ("h", 1), ("i", 1), ("o", 1)])

        # 2. PMTA delivers it and writes its accounting line through the etl pipe
        result = pipeline.run_etl(ACCOUNTING.format(rcpt=RCPT, msg=message_id))
        self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace"))

        # 3. the recipient's mail clients fetch the pixels and follow both links
        http = http_client(self)
        opened = await http.get(by_action["i"][0], headers={"User-Agent": GMAIL_PROXY_UA})
        self.assertEqual((opened.code, len(await opened.content())), (200, 43))
        opened = await http.get(by_action["o"][0], headers={"User-Agent": IPHONE_MAIL_UA})
        self.assertEqual((opened.code, len(await opened.content())), (200, 43))
        landed = {}
        for url, agent in zip(by_action["c"], (DESKTOP_CHROME_UA, ANDROID_CHROME_UA),
                              strict=True):
            response = await http.get(url, headers={"User-Agent": agent},
                                      allow_redirects=False)
            await response.content()
            self.assertEqual(response.code, 302)
            landed[codec.decode(url.rsplit("/", 1)[1]).url] = \
                response.headers.getRawHeaders("location")[0]
        self.assertEqual(landed, {
            LINK_A: LINK_A,  # &amp; in the HTML: the link itself has a plain &
            LINK_B: "https://example.org/caf%C3%A9/men%C3%BC?q=a%20b",  # as a browser sends
        })

        # 4. the feeder delivers exactly those four events to Signals, enriched
        events = await ingest.wait_for_events(4, timeout=60)
        await task.deferLater(reactor, 1.5, lambda: None)  # nothing more may follow
        self.assertEqual(len(ingest.events), 4, ingest.events)
        by_type = {e["type"]: e for e in events if e["type"] != "click"}
        clicks = {e["target_link_url"]: e for e in events if e["type"] == "click"}
        self.assertEqual(sorted(by_type), ["initial_open", "open"])
        self.assertEqual(sorted(clicks), sorted([LINK_A, LINK_B]))
        for event in events:
            self.assertEqual(event["message_id"], message_id)
            self.assertEqual(event["rcpt_to"], RCPT)
            self.assertEqual(event["ip_address"], "127.0.0.1")
            self.assertEqual(event["campaign_id"], "spring-sale")
            self.assertEqual(event["subaccount_id"], 7)
            self.assertEqual(event["friendly_from"], "news@sender.example")
            self.assertEqual(event["sending_ip"], "192.0.2.25")
            self.assertEqual(event["ip_pool"], "pool-a")
            self.assertEqual(event["routing_domain"], "example.com")
        gmail = by_type["initial_open"]["user_agent_parsed"]
        self.assertTrue(gmail["is_proxy"])
        self.assertFalse(gmail["is_prefetched"])
        iphone = by_type["open"]["user_agent_parsed"]
        self.assertEqual((iphone["os_family"], iphone["is_mobile"], iphone["is_proxy"]),
                         ("iOS", True, False))
        self.assertEqual(clicks[LINK_A]["user_agent_parsed"]["agent_family"], "Chrome")
        self.assertFalse(clicks[LINK_A]["user_agent_parsed"]["is_mobile"])
        self.assertTrue(clicks[LINK_B]["user_agent_parsed"]["is_mobile"])
        self.assertEqual(clicks[LINK_B]["user_agent"], ANDROID_CHROME_UA)
