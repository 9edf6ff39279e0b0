// node-redis 5's client-side cache (RESP3 + CLIENT TRACKING) through slotgate.
//
// Usage: node client_cache.js SLOTGATE_PORT SHARD_PORT
//
// A GET is answered from the client's cache the second time; a SET through another
// slotgate connection, then one made directly on the shard, each invalidate the cached key
// (the cache's "invalidate" event), after which the next GET reads the new value from the
// server. Prints "node-redis client cache OK" and the time each invalidation took.
"use strict";
const { createClient, BasicClientSideCache } = require("redis");

const [port, shardPort] = process.argv.slice(2).map(Number);

function assert(cond, what) {
  if (!cond) throw new Error("assertion failed: " + what);
}

// Resolves with the milliseconds until the cache drops `key` (fails after 5 s).
function invalidated(cache, key) {
  const t0 = process.hrtime.bigint();
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error("no invalidation of " + key)), 5000);
    const on = (k) => {
      if (k === null || String(k) === key) {
        clearTimeout(timer);
        cache.off("invalidate", on);
        ok(Number(process.hrtime.bigint() - t0) / 1e6);
      }
    };
    cache.on("invalidate", on);
  });
}

async function main() {
  const cache = new BasicClientSideCache({ ttl: 0, maxEntries: 0 });
  const client = createClient({ url: `redis://127.0.0.1:${port}`, RESP: 3, clientSideCache: cache });
  const other = createClient({ url: `redis://127.0.0.1:${port}` });
  const direct = createClient({ url: `redis://127.0.0.1:${shardPort}` });
  for (const c of [client, other, direct]) {
    c.on("error", (e) => { console.error("client error", e); process.exit(1); });
    await c.connect();
  }
  await other.set("csc:a", "1");
  assert((await client.get("csc:a")) === "1", "first read");
  assert((await client.get("csc:a")) === "1", "second read");
  let s = cache.stats();
  assert(s.hitCount === 1 && s.missCount === 1, "one miss then one hit: " + JSON.stringify(s));

  const times = [];
  // Through another slotgate connection.
  let done = invalidated(cache, "csc:a");
  await other.set("csc:a", "2");
  times.push(await done);
  assert((await client.get("csc:a")) === "2", "read after the write through slotgate");
  // Directly on the shard.
  done = invalidated(cache, "csc:a");
  await direct.set("csc:a", "3");
  times.push(await done);
  assert((await client.get("csc:a")) === "3", "read after the write on the shard");
  s = cache.stats();
  assert(s.missCount === 3, "each invalidation made the next read a miss: " + JSON.stringify(s));
  console.log("node-redis client cache OK " + times.map((t) => t.toFixed(2) + "ms").join(" "));
  for (const c of [client, other, direct]) await c.quit();
}

// Never hangs the test suite.
setTimeout(() => { console.error("timed out after 30 s"); process.exit(1); }, 30000).unref();
main().catch((e) => { console.error(e); process.exit(1); });
