"""The seed workflow of slotgate's users, through slotgate, with redis-py (unmodified):
async cache-aside with TTL, a transactional pipeline, pub/sub, and a lock.

Usage: python3 seed_workflow.py PORT      (exit 0 and "seed workflow OK" on success)
"""

import asyncio
import sys
import time

import redis
import redis.asyncio as aioredis


async def cache_aside(port: int) -> None:
    r = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    loads = 0

    async def load_from_backend(key: str) -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.01)
        return f"value-of-{key}"

    async def get_cached(key: str) -> str:
        v = await r.get(key)
        if v is None:
            v = await load_from_backend(key)
            await r.set(key, v, ex=60)
        return v

    run = time.time_ns()
    keys = [f"py:item:{run}:{i}" for i in range(50)]
    first = await asyncio.gather(*(get_cached(k) for k in keys))
    second = await asyncio.gather(*(get_cached(k) for k in keys))
    assert first == second == [f"value-of-{k}" for k in keys], "cache-aside values"
    assert loads == 50, f"each key loaded once, got {loads}"
    ttl = await r.ttl(keys[0])
    assert 55 <= ttl <= 60, f"TTL kept: {ttl}"
    assert await r.mget(keys[:3]) == first[:3]
    await r.aclose()


def transactional_pipeline(port: int) -> None:
    r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    with r.pipeline(transaction=True) as p:
        p.set("{py:acct}:balance", 100)
        p.incrby("{py:acct}:balance", 25)
        p.get("{py:acct}:balance")
        result = p.execute()
    assert result == [True, 125, "125"], result

    # WATCH-based optimistic update (redis-py's transaction helper retries on conflict).
    def add_interest(pipe: redis.client.Pipeline) -> None:
        balance = int(pipe.get("{py:acct}:balance"))
        pipe.multi()
        pipe.set("{py:acct}:balance", balance + 5)

    r.transaction(add_interest, "{py:acct}:balance")
    assert r.get("{py:acct}:balance") == "130"
    # Keys in different slots inside MULTI: a clear error, nothing applied.
    try:
        with r.pipeline(transaction=True) as p:
            p.set("py:a", 1)
            p.set("py:b", 2)
            p.execute()
        raise AssertionError("cross-slot transaction accepted")
    except redis.exceptions.ResponseError as e:
        # redis-py maps the CROSSSLOT prefix to ClusterCrossSlotError.
        assert "don't hash to the same slot" in str(e), e
    assert r.exists("py:a", "py:b") == 0
    r.close()


def pubsub(port: int) -> None:
    sub = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    pub = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    ps = sub.pubsub()
    ps.subscribe("py:news")
    confirm = ps.get_message(timeout=2)
    assert confirm and confirm["type"] == "subscribe", confirm
    assert pub.publish("py:news", "hello") == 1
    deadline = time.time() + 5
    msg = None
    while time.time() < deadline and msg is None:
        msg = ps.get_message(timeout=1, ignore_subscribe_messages=True)
    assert msg and msg["data"] == "hello", msg
    ps.close()
    sub.close()
    pub.close()


def lock(port: int) -> None:
    r = redis.Redis(host="127.0.0.1", port=port)
    lk = r.lock("py:lock:report", timeout=5, blocking_timeout=2)
    assert lk.acquire(), "acquired"
    other = r.lock("py:lock:report", timeout=5, blocking_timeout=0.2)
    assert not other.acquire(), "held by the first owner"
    lk.release()
    assert other.acquire(), "free after release"
    other.release()
    r.close()


def info(port: int) -> None:
    """The INFO fields clients and exporters read, as redis-py's info() parses them."""
    r = redis.Redis(host="127.0.0.1", port=port)
    r.get("py:info:probe")
    everything = r.info("everything")
    assert everything["role"] == "master", everything.get("role")
    assert len(everything["run_id"]) == 40
    for field in ("blocked_clients", "pubsub_clients", "tracking_clients", "used_memory",
                  "used_cpu_sys", "rdb_changes_since_last_save", "total_error_replies"):
        assert isinstance(everything[field], (int, float)), field
    assert everything["cmdstat_get"]["calls"] >= 1, everything.get("cmdstat_get")
    assert "p50" in everything.get("latency_percentiles_usec_get", {"p50": 0})
    try:
        r.execute_command("NOSUCHCOMMAND")
    except redis.ResponseError:
        pass
    assert r.info("errorstats")["errorstat_ERR"]["count"] >= 1
    assert "cmdstat_get" not in r.info(), "commandstats is not in the default INFO"
    r.close()


def main() -> None:
    port = int(sys.argv[1])
    asyncio.run(cache_aside(port))
    transactional_pipeline(port)
    pubsub(port)
    lock(port)
    info(port)
    print("seed workflow OK")


if __name__ == "__main__":
    main()
