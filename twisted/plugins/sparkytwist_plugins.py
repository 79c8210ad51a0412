"""twistd plugins of sparkytwist: one line each; the work is in sparkytwist.tap*."""

from twisted.application.service import ServiceMaker

sparkytrack = ServiceMaker(
    "sparkytrack", "sparkytwist.tap",
    "Engagement tracking for PowerMTA: SMTP wrapper, tracker, accounting reader, feeder",
    "sparkytrack")
etl = ServiceMaker(
    "etl", "sparkytwist.tap_etl",
    "PowerMTA accounting CSV (stdin or --file) into Redis: run as the acct-file pipe",
    "etl")
