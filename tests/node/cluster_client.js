// ioredis's Cluster client against slotgate instances that announce the cluster API.
//
// Usage: node cluster_client.js PORT  (one instance; the others are found from CLUSTER SLOTS)
//
// Phase 1: the workflow (GET/SET on many keys, MGET and a transaction on a hash tag, a
// pipeline, pub/sub); prints "READY <ports the client connected to>" and waits for a line on
// stdin (the test kills one instance meanwhile). Phase 2: every key read back within 20 s
// while the client refreshes its topology; prints "ioredis cluster OK".
"use strict";
const Redis = require("ioredis");
const readline = require("readline");

const port = Number(process.argv[2]);
const cluster = new Redis.Cluster([{ host: "127.0.0.1", port }], {
  slotsRefreshTimeout: 2000,
  clusterRetryStrategy: () => 100,
  redisOptions: { maxRetriesPerRequest: 2 },
});

function assert(cond, what) {
  if (!cond) throw new Error("assertion failed: " + what);
}

async function main() {
  await new Promise((ok, fail) => {
    cluster.once("ready", ok);
    cluster.once("error", fail);
  });
  assert(cluster.nodes("master").length === 3, "three nodes: " + cluster.nodes("master").length);
  const keys = Array.from({ length: 300 }, (_, i) => `user:${i}`);
  for (const k of keys) await cluster.set(k, k.toUpperCase());
  for (const k of keys) assert((await cluster.get(k)) === k.toUpperCase(), k);
  await cluster.mset("{cart}:a", "1", "{cart}:b", "2");
  const m = await cluster.mget("{cart}:a", "{cart}:b");
  assert(m[0] === "1" && m[1] === "2", "mget " + m);
  const tx = await cluster.multi().incr("{cart}:n").incr("{cart}:n").get("{cart}:a").exec();
  assert(JSON.stringify(tx) === JSON.stringify([[null, 1], [null, 2], [null, "1"]]), "multi " + JSON.stringify(tx));
  const pipe = await cluster.pipeline().set("{p}:x", "1").get("{p}:x").exec();
  assert(pipe[1][1] === "1", "pipeline " + JSON.stringify(pipe));
  // Pub/sub.
  const sub = cluster.duplicate();
  const got = new Promise((ok) => sub.on("message", (_ch, msg) => ok(msg)));
  await sub.subscribe("news");
  await cluster.publish("news", "hello");
  const msg = await Promise.race([got, new Promise((ok) => setTimeout(() => ok(null), 5000))]);
  assert(msg === "hello", "message " + msg);
  sub.disconnect();

  const used = [...new Set(cluster.nodes("master").filter((n) => n.status === "ready").map((n) => n.options.port))].sort();
  console.log("READY " + used.join(","));
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((ok) => rl.once("line", ok));
  rl.close();

  // One instance is gone: the client carries on through the other two.
  const deadline = Date.now() + 20000;
  let pending = keys.slice();
  let errors = 0;
  while (pending.length && Date.now() < deadline) {
    const k = pending[0];
    try {
      assert((await cluster.get(k)) === k.toUpperCase(), k);
      pending.shift();
    } catch (e) {
      errors += 1;
      await new Promise((ok) => setTimeout(ok, 100));
    }
  }
  assert(pending.length === 0, `${pending.length} keys not read back; ${errors} errors`);
  // The instances stop announcing the dead one after two failed checks (about 2 s): the
  // client's topology, read again, names two nodes.
  let live = [];
  const until = Date.now() + 10000;
  while (Date.now() < until) {
    await new Promise((ok) => cluster.refreshSlotsCache(() => ok()));
    live = cluster.nodes("master").map((n) => n.options.port).sort();
    if (live.length === 2) break;
    await new Promise((ok) => setTimeout(ok, 250));
  }
  console.log(`after the kill: ${errors} retried errors, nodes ${live}`);
  assert(live.length === 2, "two nodes left: " + live);
  console.log("ioredis cluster OK");
  cluster.disconnect();
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
