# -*- test-case-name: tests.test_accounting_writer,tests.test_erase -*-
"""Redis key names: every part derives its keys here, under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass

#: The consumer group the feeders read the events stream in.
FEEDER_GROUP = b"feeders"


@dataclass(frozen=True)
class Keys:
    prefix: str = "sparky:"

    @property
    def events(self) -> bytes:
        """The events stream (XADD MAXLEN ~ cap) the tracker writes and feeders read."""
        return f"{self.prefix}events".encode()

    @property
    def dead_letters(self) -> bytes:
        """Batches the Ingest API refused for good, with the reason (capped stream)."""
        return f"{self.prefix}events:dead".encode()

    def delivery(self, message_id: str, rcpt: str) -> bytes:
        """Delivery facts of one (message id, recipient) from the accounting stream.

        The recipient's case is folded: PMTA may log ``Fred@Example.com`` where the
        tracking token carries what RCPT TO said.
        """
        return f"{self.prefix}acct:{message_id}:{rcpt.lower()}".encode()
