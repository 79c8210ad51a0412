# -*- test-case-name: tests.test_smtp -*-
"""The wrapper: an ESMTP proxy that rewrites each message for tracking on its way to the MTA."""
