"""What every source shares: the drain loop, its source protocol, back-off, errors.

Nothing here imports a source package.
"""
