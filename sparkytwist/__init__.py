"""sparkytwist: open and click tracking for PowerMTA senders, feeding SparkPost Signals."""

__version__ = "0.1.0.dev0"
