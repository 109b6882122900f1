"""Kontur Diadoc's docflow event feed as a second drain source.

The data path, one module per step: :mod:`settings` → :mod:`client` (read a page of
``GetDocflowEvents``) → :mod:`messages` (event → AMQP message) → :mod:`source` (publish, confirm,
then advance the cursor) → :mod:`wiring` (one :class:`~bridge.drain.Drainer` per box).
"""
