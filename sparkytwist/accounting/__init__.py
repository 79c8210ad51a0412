# -*- test-case-name: tests.test_accounting -*-
"""The accounting reader: PowerMTA's accounting CSV into Redis delivery facts.

``writer`` batches facts into one Lua call per batch and signals backpressure,
``reader`` glues bytes → parser → writer and pauses its producer, ``sources`` are
where the bytes come from (stdin, a file, a spawned command), ``service`` builds
the part of ``twistd sparkytrack`` and the ``twistd etl`` program.
"""
