"""redis-py's RedisCluster against slotgate instances that announce the cluster API.

Usage: cluster_client.py PORT  (one instance; the others are found from CLUSTER SLOTS)

Phase 1: the workflow (GET/SET on many keys, MGET on a hash tag, a pipeline, pub/sub);
prints "READY <ports the client connected to>" and waits for a line on stdin (the test kills
one instance meanwhile). Phase 2: the same keys again, for at most 20 s, retrying while the
client refreshes its topology; prints "cluster client OK" when every key was read back.
"""

import sys
import time

import redis
from redis.cluster import RedisCluster

port = int(sys.argv[1])
rc = RedisCluster(host="127.0.0.1", port=port, decode_responses=True)

nodes = rc.get_nodes()
assert len(nodes) == 3, [n.name for n in nodes]

keys = [f"user:{i}" for i in range(300)]
for k in keys:
    rc.set(k, k.upper())
for k in keys:
    assert rc.get(k) == k.upper(), k

# Several keys of one slot (a hash tag): MGET and a pipeline.
rc.mset({"{cart}:a": "1", "{cart}:b": "2"})
assert rc.mget("{cart}:a", "{cart}:b") == ["1", "2"]
pipe = rc.pipeline()
pipe.incr("{cart}:n")
pipe.incr("{cart}:n")
pipe.get("{cart}:a")
assert pipe.execute() == [1, 2, "1"]

# Pub/sub.
ps = rc.pubsub()
ps.subscribe("news")
deadline = time.time() + 5
msg = None
while time.time() < deadline and (msg is None or msg["type"] != "subscribe"):
    msg = ps.get_message(timeout=0.2)
rc.publish("news", "hello")
deadline = time.time() + 5
got = None
while time.time() < deadline:
    m = ps.get_message(timeout=0.2)
    if m and m["type"] == "message":
        got = m["data"]
        break
assert got == "hello", got
ps.close()

used = sorted({n.port for n in rc.get_nodes() if n.redis_connection is not None})
print("READY", ",".join(str(p) for p in used), flush=True)
sys.stdin.readline()

# One instance is gone: the client carries on through the other two after refreshing its
# topology (slotgate instances stop announcing a peer that does not answer).
deadline = time.time() + 20
pending = list(keys)
errors = 0
while pending and time.time() < deadline:
    k = pending[0]
    try:
        assert rc.get(k) == k.upper(), k
        pending.pop(0)
    except (redis.exceptions.ConnectionError, redis.exceptions.ClusterError,
            redis.exceptions.TimeoutError) as e:
        errors += 1
        time.sleep(0.1)
assert not pending, f"{len(pending)} keys not read back; {errors} errors"
live = sorted(n.port for n in rc.get_nodes())
print(f"after the kill: {errors} retried errors, nodes {live}", flush=True)
assert len(live) == 2, live
print("cluster client OK", flush=True)
