"""Emulators of the upstream services, for tests, benchmarks and the demo (not in the image)."""
