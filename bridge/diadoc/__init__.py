"""Kontur Diadoc's docflow event feed as a second drain source.

The data path, one module per step: :mod:`settings` → :mod:`auth` (OpenID Connect, rotating
refresh token) → :mod:`client` (read a page of ``GetDocflowEvents``; :mod:`headers` reads what
the answer's headers say) → :mod:`cursor` (the page, and where the next read resumes) →
:mod:`messages` (event → AMQP message) → :mod:`delivery` (publish what is new, confirm, set
malformed events aside) → :mod:`source` (advance the cursor) with :mod:`rescan` (late events) →
:mod:`wiring` (one :class:`~bridge.core.drainer.Drainer` per box).
"""
