"""Scaled mode: several replicas share the portals through shard leases in PostgreSQL."""
