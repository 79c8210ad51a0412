# -*- test-case-name: tests.test_feeder_sinks -*-
"""What each HTTP answer means for a batch, the Ingest URL, and the file sink."""

from __future__ import annotations

import email.utils
import gzip
import os

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sparkytwist.feeder.sinks import (
    MAX_RETRY_AFTER,
    Delivered,
    EncodedBatch,
    FileSink,
    Rejected,
    Retry,
    classify,
    ingest_url,
    retry_after_seconds,
)


class ClassifyTests(SynchronousTestCase):
    def test_200_is_delivered_with_the_batch_id(self) -> None:
        outcome = classify(200, {}, b'{"results":{"id":"b-1"}}', 0)
        self.assertEqual(outcome, Delivered(200, "b-1"))

    def test_retryable(self) -> None:
        for status in (408, 429, 500, 502, 503, 504):
            self.assertIsInstance(classify(status, {}, b"", 0), Retry, status)
        self.assertEqual(classify(503, {"retry-after": "7"}, b"", 0).retry_after,  # type: ignore[union-attr]
                         7)

    def test_refused_for_good(self) -> None:
        for status in (400, 404, 413, 415, 422):
            outcome = classify(status, {}, b'{"errors":[]}', 0)
            self.assertEqual(outcome, Rejected(status, '{"errors":[]}', pause=False))
        for status in (401, 403):
            self.assertTrue(classify(status, {}, b"", 0).pause)  # type: ignore[union-attr]

    def test_other_2xx_only_for_webhooks(self) -> None:
        self.assertIsInstance(classify(202, {}, b"", 0), Retry)
        self.assertIsInstance(classify(202, {}, b"", 0, any_2xx=True), Delivered)
        self.assertIsInstance(classify(302, {}, b"", 0, any_2xx=True), Retry)


class RetryAfterTests(SynchronousTestCase):
    def test_seconds_date_and_nonsense(self) -> None:
        now = 1_700_000_000.0
        self.assertEqual(retry_after_seconds("120", now), 120)
        date = email.utils.formatdate(now + 90, usegmt=True)
        self.assertAlmostEqual(retry_after_seconds(date, now) or 0, 90, delta=1)
        self.assertEqual(retry_after_seconds(email.utils.formatdate(now - 90), now), 0)
        self.assertEqual(retry_after_seconds("999999", now), MAX_RETRY_AFTER)
        self.assertIsNone(retry_after_seconds("soon", now))
        self.assertIsNone(retry_after_seconds(None, now))


class IngestUrlTests(SynchronousTestCase):
    def test_host_or_base_url(self) -> None:
        self.assertEqual(ingest_url("api.eu.sparkpost.com"),
                         "https://api.eu.sparkpost.com/api/v1/ingest/events")
        self.assertEqual(ingest_url("http://127.0.0.1:8999/"),
                         "http://127.0.0.1:8999/api/v1/ingest/events")
        self.assertEqual(ingest_url("https://proxy.example:8443/sp"),
                         "https://proxy.example:8443/sp/api/v1/ingest/events")
        for bad in ("", "ftp://x", "https://", "https://h/?a=1"):
            self.assertRaises(ValueError, ingest_url, bad)


class FileSinkTests(TestCase):
    async def test_atomic_file_named_by_ids(self) -> None:
        directory = self.mktemp()
        sink = FileSink(directory, reactor)
        body = gzip.compress(b'{"a":1}\n')
        batch = EncodedBatch(body, 8, 1, b"1700000000000-0", b"1700000000001-3")
        outcome = await sink.deliver(batch)
        name = "events-1700000000000-0_1700000000001-3.ndjson.gz"
        self.assertEqual(outcome, Delivered(200, name))
        self.assertEqual(os.listdir(directory), [name])  # no temp file left
        with open(os.path.join(directory, name), "rb") as f:
            self.assertEqual(f.read(), body)

    async def test_unwritable_directory_is_retried(self) -> None:
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        sink = FileSink(os.path.join(blocker, "sub"), reactor)
        outcome = await sink.deliver(EncodedBatch(b"x", 1, 1, b"1-0", b"1-0"))
        self.assertIsInstance(outcome, Retry)
