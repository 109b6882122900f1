"""The statements of the lease manager (``bridge.scaling.leases``); parameters are named in each.

Expiries come from the database clock (``now()``), never from a replica's, so replicas whose
clocks disagree still agree on whether a lease has expired.
"""

RENEW = """
WITH beat AS (
    INSERT INTO replicas VALUES (%(me)s, %(n)s, now() + %(ttl)s * interval '1 second')
    ON CONFLICT (replica_id) DO UPDATE SET shards = excluded.shards,
        expires_at = excluded.expires_at
)
UPDATE leases SET expires_at = now() + %(ttl)s * interval '1 second'
WHERE holder = %(me)s AND expires_at > now()
    AND (shard, epoch) IN (SELECT * FROM unnest(%(shards)s::int[], %(epochs)s::bigint[]))
RETURNING shard, epoch
"""
CLAIM = """
WITH free AS (
    SELECT shard FROM leases
    WHERE shard < %(n)s AND NOT shard = ANY(%(mine)s::int[])
        AND (holder = '' OR holder = %(me)s OR expires_at <= now())
    ORDER BY shard LIMIT %(need)s FOR UPDATE SKIP LOCKED
)
UPDATE leases l SET holder = %(me)s, epoch = l.epoch + 1,
    expires_at = now() + %(ttl)s * interval '1 second'
FROM free WHERE l.shard = free.shard
RETURNING l.shard, l.epoch
"""
RELEASE = (
    "UPDATE leases SET holder = '', expires_at = '-infinity' "
    "WHERE holder = %s AND shard = ANY(%s::int[])"
)
COUNTS = """
SELECT r.replica_id, count(l.shard) FILTER (WHERE l.expires_at > now() AND l.shard < %(n)s)
FROM replicas r LEFT JOIN leases l ON l.holder = r.replica_id
WHERE r.expires_at > now() AND r.replica_id <> %(me)s
GROUP BY r.replica_id
"""
FREE = """
SELECT count(*) FROM leases
WHERE shard < %(n)s AND (holder = '' OR expires_at <= now()) AND NOT shard = ANY(%(mine)s::int[])
"""
