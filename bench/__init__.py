"""Benchmarks of the bridge against the emulator and a real RabbitMQ: ``python -m bench``.

Not part of the pass/fail test suite: every target is informational. Each scenario lives in its
own module under ``bench.scenarios``; ``bench.profile`` profiles the drain with py-spy.
"""
