# -*- test-case-name: tests.test_tracker -*-
"""The tracker: pixels and redirects for tracking tokens, events onto the Redis stream."""
