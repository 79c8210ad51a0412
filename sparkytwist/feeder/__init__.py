# -*- test-case-name: tests.test_feeder -*-
"""The feeder: tracking events from the Redis stream to SparkPost Ingest (or a file/webhook).

``batch`` decides when a batch is complete (pure), ``consumer`` talks to the stream
and its consumer group, ``sinks`` delivers one encoded batch and says whether to
ack, retry or dead-letter it, and ``service`` drives them from a LoopingCall.
"""
