#!/usr/bin/env python3
"""Traffic drivers and the final report of scripts/soak.sh (issue 14.14).

    soak.py drive --port P --duration S --stats FILE      mixed traffic against slotgate
    soak.py report --csv FILE --stats FILE --log FILE ...  summary, verdict and exit code

`drive` runs, until the deadline, a set of driver threads against slotgate on 127.0.0.1:P:
redis-benchmark runs (GET/SET/MSET/MGET/INCR/LPUSH/LPOP, pipelined and not, values of
100 B to 256 KiB), read-through GETs, pub/sub, MULTI/EXEC, EVAL/EVALSHA, blocking pops, and
client churn: short connections, clients that disconnect mid-pipeline or mid-transaction,
and "hogs" that pipeline GETs of a 256 KiB value without reading until slotgate closes
them at their output buffer limit. Every driver counts its operations and its errors;
errors are "expected" when they are the documented replies of an injected fault (a
stopped or killed shard, a stopped origin), "unexpected" otherwise. The counts go to the
JSON file given by --stats. Needs only the standard library and redis-py.

`report` reads the samples soak.sh wrote (CSV), the drivers' counts and slotgate's log,
prints the summary and exits non-zero if slotgate died, if its RSS grew past the threshold
after the warm-up, or if its descriptors did not come back down once traffic stopped.
"""

import argparse
import collections
import csv
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

# --------------------------------------------------------------------------------------------
# drive
# --------------------------------------------------------------------------------------------

# Replies slotgate gives while a fault is injected (README, "Errors slotgate itself returns").
EXPECTED_ERRORS = ("shard unavailable", "outcome unknown", "origin failed")
BIG = 256 * 1024  # the largest value size used


class Stats:
    """Thread-safe counters: operations and errors per driver, plus named extras."""

    def __init__(self, clock_offset=0):
        self.lock = threading.Lock()
        # Error times are reported in soak.sh's clock (seconds since its first sample).
        self.t0 = time.monotonic() - clock_offset
        self.first_seen = {}
        self.expected_at = collections.Counter()  # second -> expected errors in it
        self.ops = collections.Counter()
        self.expected = collections.Counter()  # (driver, kind) -> count
        self.unexpected = collections.Counter()  # (driver, text) -> count
        self.extra = collections.Counter()

    def op(self, driver, n=1):
        with self.lock:
            self.ops[driver] += n

    def add(self, name, n=1):
        with self.lock:
            self.extra[name] += n

    def error(self, driver, exc, expected_connection_loss=False):
        """Files an exception (or an error text) as expected or unexpected."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = None
        for pattern in EXPECTED_ERRORS:
            if pattern in text:
                kind = pattern
        if kind is None and expected_connection_loss and isinstance(
            exc, (ConnectionError, OSError, redis_exceptions().ConnectionError)
        ):
            kind = "connection lost"
        with self.lock:
            if kind is not None:
                self.expected[(driver, kind)] += 1
                self.expected_at[int(time.monotonic() - self.t0)] += 1
            else:
                # Numbers (ports, counts) vary; keep the text short so similar errors group.
                key = (driver, f"{type(exc).__name__}: {text[:160]}")
                self.unexpected[key] += 1
                self.first_seen.setdefault(key, round(time.monotonic() - self.t0))

    def as_json(self):
        with self.lock:
            return {
                "ops": dict(self.ops),
                "expected_errors": [[d, k, n] for (d, k), n in sorted(self.expected.items())],
                "unexpected_errors": [
                    [d, t, n, self.first_seen[(d, t)]] for (d, t), n in sorted(self.unexpected.items())
                ],
                "extra": dict(self.extra),
                "expected_error_seconds": dict(self.expected_at),
            }


def redis_exceptions():
    import redis.exceptions

    return redis.exceptions


class Driver:
    def __init__(self, port, deadline, stats, seed):
        self.port = port
        self.deadline = deadline
        self.stats = stats
        self.stop = threading.Event()
        self.seed = seed
        self.children = set()  # redis-benchmark processes, killed at the deadline or on TERM
        self.children_lock = threading.Lock()

    def running(self):
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def pause(self, seconds):
        """Sleeps, but wakes up at once when the run ends."""
        self.stop.wait(max(0.0, min(seconds, self.deadline - time.monotonic())))

    def client(self, **kw):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: the soak wants to see every error slotgate returns.
        kw.setdefault("socket_timeout", 5)
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
            **kw,
        )

    def raw(self, timeout=5):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def loop(self, name, body, *args):
        """Runs `body(rng, *args)` until the deadline; an exception is counted and the loop
        goes on after a short pause (a new client is made by the body when it needs one)."""
        rng = random.Random(f"{self.seed}-{name}")
        while self.running():
            try:
                body(rng, *args)
            except Exception as e:  # noqa: BLE001 - every error is counted
                self.stats.error(name, e)
                self.pause(0.05)

    # -- redis-benchmark --------------------------------------------------------------------

    def scenarios(self):
        p = ["-h", "127.0.0.1", "-p", str(self.port), "-q"]
        mget = ["MGET"] + ["key:__rand_int__"] * 10
        return [
            ("get/set 100B", p + ["-t", "set,get", "-n", "40000", "-c", "20", "-d", "100", "-r", "100000"]),
            ("get/set 512B P16", p + ["-t", "set,get", "-n", "200000", "-c", "20", "-P", "16", "-d", "512", "-r", "100000"]),
            ("mset P4", p + ["-t", "mset", "-n", "30000", "-c", "10", "-P", "4", "-r", "100000"]),
            ("mget 10 keys", p + ["-n", "30000", "-c", "10", "-r", "100000"] + mget),
            ("mget 10 keys P8", p + ["-n", "60000", "-c", "10", "-P", "8", "-r", "100000"] + mget),
            ("incr/lpush/lpop P8", p + ["-t", "incr,lpush,lpop", "-n", "60000", "-c", "10", "-P", "8", "-r", "100000"]),
            ("get/set 4KiB", p + ["-t", "set,get", "-n", "20000", "-c", "10", "-d", "4096", "-r", "10000"]),
            ("get/set 64KiB", p + ["-t", "set,get", "-n", "3000", "-c", "8", "-d", "65536", "-r", "500"]),
            ("get/set 256KiB P4", p + ["-t", "set,get", "-n", "800", "-c", "4", "-P", "4", "-d", str(BIG), "-r", "100"]),
        ]

    def benchmark(self, rng, _idx):
        name, args = rng.choice(self.scenarios())
        with self.children_lock:
            if not self.running():
                return
            proc = subprocess.Popen(
                ["redis-benchmark"] + args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            self.children.add(proc)
        try:
            out, _ = proc.communicate(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.stats.add("benchmark runs cut at the deadline")
            return
        finally:
            with self.children_lock:
                self.children.discard(proc)
        if self.stop.is_set():
            return
        lines = [ln.strip() for ln in re.split(r"[\r\n]", out) if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("Error") or "ERR" in ln[:20]]
        if proc.returncode == 0 and not errors:
            self.stats.op("redis-benchmark")
            self.stats.add(f"benchmark: {name}")
            # Requests in the run: -n times the number of tests it lists.
            n = int(args[args.index("-n") + 1])
            tests = len([ln for ln in lines if "requests per second" in ln])
            self.stats.add("benchmark requests", n * tests)
        else:
            # redis-benchmark 7 stops at the first error reply.
            self.stats.add("benchmark runs stopped by an error")
            text = errors[0] if errors else f"exit {proc.returncode}: {lines[-1] if lines else ''}"
            self.stats.error("redis-benchmark", RuntimeError(text))
            self.pause(0.5)

    # -- redis-py drivers ---------------------------------------------------------------------

    def readthrough(self, rng, box):
        """GETs and MGETs of keys owned by the read-through rules, with invalidations."""
        r = box.get("r") or box.setdefault("r", self.client())
        roll = rng.random()
        if roll < 0.55:
            key, found = f"label:PO{rng.randrange(2000)}", True  # hot: mostly hits
        elif roll < 0.75:
            key, found = f"label:PO{rng.randrange(200000)}", True  # mostly misses: the origin
        elif roll < 0.90:
            key, found = f"slabel:PO{rng.randrange(500)}", True  # the rule with a grace period
        elif roll < 0.97:
            key, found = f"label:XX{rng.randrange(5000)}", False  # 404: negative caching
        else:
            keys = [f"label:PO{rng.randrange(5000)}" for _ in range(5)]
            vals = r.mget(keys)
            self.stats.op("readthrough")
            for k, v in zip(keys, vals):
                # nil is allowed in an MGET: a failed fetch is nil there.
                if v is not None and k[len("label:"):].encode() not in v:
                    self.stats.error("readthrough", RuntimeError(f"MGET {k}: wrong value {v[:60]!r}"))
            if rng.random() < 0.3:
                r.execute_command("SLOTGATE.INVALIDATE", *keys[:2])
            return
        try:
            v = r.get(key)
        except Exception:
            box.pop("r", None)
            raise
        self.stats.op("readthrough")
        rest = key.split(":", 1)[1]
        if found and (v is None or f'"id":"{rest}"'.encode() not in v):
            self.stats.error("readthrough", RuntimeError(f"GET {key}: wrong value {v!r:.80}"))
        elif not found and v is not None:
            self.stats.error("readthrough", RuntimeError(f"GET {key}: expected nil, got {v!r:.80}"))

    def transactions(self, rng, box):
        """MULTI/EXEC of two counters in one slot; b == 2a must always hold. Some with WATCH."""
        import redis

        r = box.get("r") or box.setdefault("r", self.client())
        n = rng.randrange(1000)
        a, b = f"{{txn{n}}}:a", f"{{txn{n}}}:b"
        try:
            if rng.random() < 0.8:
                p = r.pipeline(transaction=True)
                p.incr(a).incrby(b, 2).expire(a, 600).expire(b, 600)
                va, vb, _, _ = p.execute()
            else:
                with r.pipeline() as p:
                    p.watch(a, b)
                    va, vb = int(p.get(a) or 0) + 1, int(p.get(b) or 0) + 2
                    p.multi()
                    p.set(a, va, ex=600).set(b, vb, ex=600)
                    try:
                        p.execute()
                    except redis.WatchError:
                        self.stats.add("transactions: WATCH conflicts")
                        return
        except redis.ConnectionError:
            box.pop("r", None)
            raise
        self.stats.op("transactions")
        if int(vb) != 2 * int(va):
            self.stats.add("transactions: invariant violations")
            self.stats.error("transactions", RuntimeError(f"{a}={va} but {b}={vb}"))

    def scripts(self, rng, box):
        """EVALSHA through redis-py's Script (EVAL again after NOSCRIPT: shard restarts), and
        EVAL of a script returning a nested table."""
        import redis

        r = box.get("r") or box.setdefault("r", self.client())
        if "incr" not in box:
            box["incr"] = r.register_script(
                "local v = redis.call('INCRBY', KEYS[1], ARGV[1]) "
                "redis.call('EXPIRE', KEYS[1], 600) return v"
            )
        try:
            if rng.random() < 0.8:
                v = box["incr"](keys=[f"eval:{rng.randrange(5000)}"], args=[rng.randrange(1, 10)])
                ok = isinstance(v, int) and v > 0
            else:
                v = r.eval("return {1, {2, {3, ARGV[1]}}}", 1, f"eval:{rng.randrange(5000)}", "x")
                ok = v == [1, [2, [3, b"x"]]]
        except redis.ConnectionError:
            box.pop("r", None)
            box.pop("incr", None)
            raise
        self.stats.op("scripts")
        if not ok:
            self.stats.error("scripts", RuntimeError(f"wrong script reply {v!r:.80}"))

    def blocking(self, rng, box):
        """LPUSH + BLPOP (served at once), and a BLPOP that times out."""
        r = box.get("r") or box.setdefault("r", self.client())
        k = f"blk:{rng.randrange(1000)}"
        try:
            r.lpush(k, "x")
            got = r.blpop([k], timeout=1)
            none = r.blpop([f"blk:empty:{rng.randrange(100)}"], timeout=0.1) if rng.random() < 0.1 else None
        except Exception:
            box.pop("r", None)
            raise
        self.stats.op("blocking")
        if got is None or none is not None:
            self.stats.error("blocking", RuntimeError(f"BLPOP: {got!r} / {none!r}"))

    def publisher(self, rng, box):
        r = box.get("r") or box.setdefault("r", self.client())
        try:
            for _ in range(20):
                ch = "soak.ch" if rng.random() < 0.5 else f"soak.p.{rng.randrange(10)}"
                receivers = r.publish(ch, f"msg-{rng.randrange(10**9)}")
                self.stats.add("pubsub: published")
                self.stats.add("pubsub: deliveries promised", receivers)
        except Exception:
            box.pop("r", None)
            raise
        self.stats.op("publisher", 20)
        self.pause(0.1)  # about 200 messages a second

    def subscriber(self, rng, _box):
        """Subscribes to a channel and a pattern and counts messages; resubscribes when
        slotgate disconnects it (it does when the first shard, which carries the channels,
        restarts)."""
        c = self.client(socket_timeout=10)
        ps = c.pubsub()
        try:
            ps.subscribe("soak.ch")
            ps.psubscribe("soak.p.*")
            self.stats.add("pubsub: subscriptions")
            while self.running():
                m = ps.get_message(timeout=1.0)
                if m and m["type"] in ("message", "pmessage"):
                    self.stats.op("subscriber")
                    self.stats.add("pubsub: received")
        except Exception as e:  # noqa: BLE001
            self.stats.error("subscriber", e, expected_connection_loss=True)
            self.pause(0.2)
        finally:
            try:
                ps.close()
                c.close()
            except Exception:  # noqa: BLE001
                pass

    def churn(self, rng, _box):
        """Short connections: a few commands (RESP2 or RESP3), then close, sometimes with a
        reset instead of a FIN. About 40 connections a second per thread."""
        if rng.random() < 0.7:
            c = self.client(protocol=3 if rng.random() < 0.3 else 2)
            k = f"churn:{rng.randrange(10000)}"
            c.set(k, "v" * rng.choice((10, 1000)), ex=60)
            c.get(k)
            c.ping()
            c.close()
        else:
            s = self.raw()
            s.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$5\r\nchurn\r\n")
            read_replies(s, 2)
            close(s, reset=rng.random() < 0.5)
        self.stats.op("churn")
        self.stats.add("churn: connections")
        self.pause(0.025)

    def abrupt(self, rng, _box):
        """Clients that go away at a bad moment. About 10 a second."""
        s = self.raw()
        kind = rng.randrange(6)
        try:
            if kind == 0:  # a long pipeline of GETs (some of 256 KiB values), partly read
                reqs = b"".join(cmd(b"GET", f"key:{rng.randrange(100):012d}") for _ in range(300))
                s.sendall(reqs)
                s.settimeout(0.5)
                try:
                    s.recv(rng.choice((1, 4096, 65536)))
                except socket.timeout:
                    pass
            elif kind == 1:  # half a command
                s.sendall(b"*3\r\n$3\r\nSET\r\n$5\r\nhalf" + b"\r\n$100\r\n" + b"x" * 50)
            elif kind == 2:  # inside a transaction (a dedicated shard connection)
                t = f"{{abrupt{rng.randrange(100)}}}"
                s.sendall(cmd(b"MULTI") + cmd(b"SET", t + ":a", "1") + cmd(b"INCR", t + ":b"))
                read_replies(s, 3)
            elif kind == 3:  # a subscriber (dedicated subscriber connection)
                s.sendall(cmd(b"SUBSCRIBE", "soak.ch", "soak.other"))
                read_replies(s, 2)
            elif kind == 4:  # blocked (dedicated connection), gone before the timeout
                s.sendall(cmd(b"BLPOP", f"blk:never:{rng.randrange(100)}", "5"))
                time.sleep(0.1)
            else:  # a pipeline of writes, closed with a reset before any reply is read
                s.sendall(b"".join(cmd(b"SET", f"abrupt:{i}", "y" * 200) for i in range(50)))
        finally:
            close(s, reset=rng.random() < 0.5)
        self.stats.op("abrupt")
        self.stats.add(f"abrupt: kind {kind}")
        self.pause(0.1)

    def hog(self, rng, box):
        """Every ~30 s: a client that pipelines GETs of a 256 KiB value and never reads. With
        soak.sh's `client_output_buffer_limit_normal = "32mb 8mb 10"`, slotgate must close it
        (checked in CLIENT LIST by its name); the time it took is recorded."""
        self.pause(box.get("wait", 5))
        box["wait"] = 30
        if not self.running():
            return
        r = self.client()
        try:
            r.set("soak:big", b"h" * BIG, ex=3600)
            name = f"soak-hog-{rng.randrange(10**6)}"
            s = self.raw()
            s.sendall(cmd(b"CLIENT", "SETNAME", name))
            read_replies(s, 1)
            flood = cmd(b"GET", "soak:big") * 1000  # 250 MiB of replies
            sender = threading.Thread(target=send_quietly, args=(s, flood), daemon=True)
            sender.start()
            start = time.monotonic()
            closed = False
            while self.running() and time.monotonic() - start < 40:
                self.pause(0.5)
                names = [c.get("name") for c in r.client_list()]
                if name not in names:
                    closed = True
                    break
            close(s, reset=True)
            if closed:
                self.stats.add("hogs closed by slotgate")
                self.stats.add("hog seconds to close (sum)", round(time.monotonic() - start))
            elif self.running():
                self.stats.add("hogs not closed within 40 s")
                self.stats.error("hog", RuntimeError("a client that never reads was not closed within 40 s"))
            self.stats.op("hog")
        finally:
            r.close()

    # -- the run ------------------------------------------------------------------------------

    def run(self):
        plan = [
            ("redis-benchmark", self.benchmark, 2),
            # Four: a miss costs about 44 ms with the demo origin (it writes its head and
            # body separately, and the second write waits for a delayed ACK).
            ("readthrough", self.readthrough, 4),
            ("transactions", self.transactions, 1),
            ("scripts", self.scripts, 1),
            ("blocking", self.blocking, 1),
            ("publisher", self.publisher, 1),
            ("subscriber", self.subscriber, 2),
            ("churn", self.churn, 2),
            ("abrupt", self.abrupt, 1),
            ("hog", self.hog, 1),
        ]
        threads = []
        for name, body, count in plan:
            for i in range(count):
                arg = i if body == self.benchmark else {}
                t = threading.Thread(target=self.loop, args=(name, body, arg), name=f"{name}-{i}", daemon=True)
                t.start()
                threads.append(t)
        while any(t.is_alive() for t in threads) and self.running():
            time.sleep(0.5)
        self.finish(threads)

    def finish(self, threads):
        self.stop.set()
        with self.children_lock:
            for p in self.children:
                p.kill()
        until = time.monotonic() + 15  # clients time out after 5 s at most
        for t in threads:
            t.join(timeout=max(0.0, until - time.monotonic()))


def cmd(*args):
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read_replies(s, n):
    """Reads until at least `n` CRLF-terminated lines arrived (enough for short replies)."""
    buf = b""
    while buf.count(b"\r\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def close(s, reset=False):
    try:
        if reset:  # SO_LINGER 0: close() sends a RST
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    except OSError:
        pass


def send_quietly(s, data):
    try:
        s.settimeout(60)
        s.sendall(data)
    except OSError:
        pass  # closed by slotgate (expected) or by us


def drive(args):
    stats = Stats(args.clock_offset)
    deadline = time.monotonic() + args.duration
    d = Driver(args.port, deadline, stats, args.seed)

    def on_term(_sig, _frame):
        d.stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    started = time.monotonic()
    try:
        d.run()
    finally:
        d.finish([])
        out = stats.as_json()
        out["seconds"] = round(time.monotonic() - started, 1)
        with open(args.stats, "w") as f:
            json.dump(out, f, indent=1)


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def median(xs):
    return statistics.median(xs) if xs else 0


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:.1f}"


def report(args):
    rows = list(csv.DictReader(open(args.csv)))
    for r in rows:
        for k in ("t_s", "rss_kib", "fds", "threads", "clients", "commands"):
            r[k] = int(r[k]) if r[k] not in ("", None) else None
    stats = {}
    if os.path.exists(args.stats):
        stats = json.load(open(args.stats))
    log = open(args.log, errors="replace").read() if os.path.exists(args.log) else ""

    live = [r for r in rows if r["rss_kib"] is not None]
    idle = [r for r in live if r["phase"] == "idle"]
    traffic = [r for r in live if r["phase"] in ("warmup", "traffic")]
    final = [r for r in live if r["phase"] == "final"]
    warm_end = args.warmup
    # Medians over windows, so one sample taken while a hog holds 32 MiB does not decide.
    warm_win = [r for r in traffic if warm_end <= r["t_s"] < warm_end + max(10, args.duration * 0.1)]
    last_t = traffic[-1]["t_s"] if traffic else 0
    end_win = [r for r in traffic if r["t_s"] > last_t - max(10, args.duration * 0.1)]

    failures, warnings = [], []
    out = []
    p = out.append
    p("")
    p(f"== soak summary: {args.duration}s of traffic, warm-up {warm_end}s, {len(rows)} samples ==")
    p("")
    p("| point | RSS MiB | fds | threads | clients |")
    p("|---|---:|---:|---:|---:|")

    def line(label, rs, agg=median):
        if not rs:
            p(f"| {label} | - | - | - | - |")
            return None, None
        rss = agg([r["rss_kib"] for r in rs])
        fds = agg([r["fds"] for r in rs])
        thr = agg([r["threads"] for r in rs])
        cl = agg([r["clients"] for r in rs if r["clients"] is not None] or [0])
        p(f"| {label} | {mib(rss)} | {fds:g} | {thr:g} | {cl:g} |")
        return rss, fds

    base_rss, base_fds = line("idle before traffic", idle[-1:])
    warm_rss, warm_fds = line(f"after warm-up (median, t={warm_end}s..)", warm_win)
    max_rss, max_fds = line("max during traffic", traffic, agg=max)
    line("min during traffic", traffic, agg=min)
    end_rss, end_fds = line(f"end of traffic (median, t>{last_t - max(10, int(args.duration * 0.1))}s)", end_win)
    fin_rss, fin_fds = line(f"final (idle, {args.settle}s after traffic)", final[-1:])
    p("")

    cmds = [r["commands"] for r in live if r["commands"] is not None]
    total_cmds = (max(cmds) - min(cmds)) if cmds else 0
    p(f"commands processed (INFO total_commands_processed): {total_cmds:,}"
      f" (avg {total_cmds / max(1, args.duration):,.0f}/s over the traffic)")
    alive = args.alive == 1
    p(f"slotgate alive the whole run: {'yes' if alive else 'NO'}"
      + ("" if alive else f" ({args.death})"))
    if not alive:
        failures.append(f"slotgate died: {args.death}")

    # RSS: from the warm-up to the end of the traffic, and to the final idle sample.
    if warm_rss:
        limit = max(warm_rss * args.rss_pct / 100, args.rss_mib * 1024)
        for label, v in (("end of traffic", end_rss), ("final", fin_rss)):
            if v is not None and v - warm_rss > limit:
                failures.append(
                    f"RSS grew from {mib(warm_rss)} MiB after warm-up to {mib(v)} MiB at {label}"
                    f" (+{mib(v - warm_rss)} MiB > {mib(limit)} MiB allowed)")
        p(f"RSS after warm-up {mib(warm_rss)} MiB -> end of traffic {mib(end_rss)} MiB"
          f" -> final {mib(fin_rss)} MiB (allowed growth {mib(limit)} MiB:"
          f" {args.rss_pct}% or {args.rss_mib} MiB, the larger); max {mib(max_rss)} MiB")
    after = [r for r in traffic if r["t_s"] >= warm_end]
    if len(after) >= 3:
        xs = [r["t_s"] / 60 for r in after]
        ys = [r["rss_kib"] / 1024 for r in after]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0
        p(f"RSS trend after warm-up (least squares over {len(after)} samples): {slope:+.2f} MiB/min")
    if fin_fds is not None and warm_fds is not None:
        p(f"fds: idle before {base_fds}, after warm-up {warm_fds:g}, max {max_fds}, final {fin_fds}"
          f" (margin {args.fd_margin})")
        if fin_fds > warm_fds + args.fd_margin:
            failures.append(f"fds at the end ({fin_fds}) exceed the warm-up count ({warm_fds:g}) by more than {args.fd_margin}")
        if base_fds is not None:
            # Shard connections kept for reuse (the per-worker pool of dedicated connections
            # for transactions and blocking commands, RESP3 connections) and the origin's
            # keep-alive connections stay after the traffic: a few dozen at most.
            p(f"fds idle after traffic vs idle before: {fin_fds - base_fds:+d}"
              " (pooled shard connections, RESP3 connections, origin keep-alive)")
            if fin_fds > base_fds + 4 * args.fd_margin:
                warnings.append(f"final idle fds {fin_fds} > idle baseline {base_fds} + {4 * args.fd_margin}")
    elif alive:
        failures.append("no final sample")

    # The drivers.
    p("")
    p("drivers (operations; errors expected from the injected faults; unexpected errors):")
    ops = stats.get("ops", {})
    exp = collections.defaultdict(dict)
    for d, k, n in stats.get("expected_errors", []):
        exp[d][k] = n
    unexp = collections.defaultdict(list)
    for d, t, n, first in stats.get("unexpected_errors", []):
        unexp[d].append((n, t, first))
    names = sorted(set(ops) | set(exp) | set(unexp))
    p("")
    p("| driver | ops | expected errors | unexpected errors |")
    p("|---|---:|---|---:|")
    for d in names:
        e = ", ".join(f"{k} {n}" for k, n in sorted(exp[d].items())) or "0"
        u = sum(n for n, _, _ in unexp[d])
        p(f"| {d} | {ops.get(d, 0):,} | {e} | {u} |")
    extra = stats.get("extra", {})
    if "pubsub: deliveries promised" in extra:
        lost = extra["pubsub: deliveries promised"] - extra.get("pubsub: received", 0)
        p(f"pub/sub: {extra.get('pubsub: published', 0):,} published, "
          f"{extra['pubsub: deliveries promised']:,} deliveries promised by PUBLISH, "
          f"{extra.get('pubsub: received', 0):,} received ({lost:+,} not received: "
          f"subscribers disconnected by a shard restart)")
    if extra:
        p("")
        p("  " + "; ".join(f"{k}: {v:,}" for k, v in sorted(extra.items())))
    # Fault replies outside every fault's window (from a second before it to 6 s after it
    # was undone: reconnect backoff, op timeout, 3 x op timeout for a hung connection).
    windows = []
    if args.faults and os.path.exists(args.faults):
        for row in csv.reader(open(args.faults)):
            windows.append((int(row[0]) - 1, int(row[1]) + 6))
    stray = sorted(
        (int(t), n) for t, n in stats.get("expected_error_seconds", {}).items()
        if not any(a <= int(t) <= b for a, b in windows))
    p("")
    p(f"faults injected: {len(windows)}; fault replies outside their windows: "
      f"{sum(n for _, n in stray)}" + (f" (at t={', '.join(f'{t}s' for t, _ in stray[:10])})" if stray else ""))
    if stray:
        warnings.append(f"{sum(n for _, n in stray)} fault replies (shard unavailable, outcome unknown, "
                        "origin failed) while no fault was injected")
    n_unexp = sum(n for v in unexp.values() for n, _, _ in v)
    if n_unexp:
        p("")
        p(f"unexpected errors ({n_unexp}; t = first seen, the table's clock):")
        for d in sorted(unexp):
            for n, t, first in sorted(unexp[d], reverse=True)[:8]:
                p(f"  {d}: {n} x {t} (t={first}s)")
        warnings.append(f"{n_unexp} unexpected driver errors")
    if extra.get("transactions: invariant violations"):
        failures.append("MULTI/EXEC invariant violated")

    # slotgate's log.
    levels = collections.Counter(m.group(1) for m in re.finditer(r"Z\s+(ERROR|WARN)\s", log))
    panics = len(re.findall(r"panicked", log))
    reloads = len(re.findall(r"configuration reloaded \(SIGHUP\)", log))
    obl = len(re.findall(r"output buffer limits", log))
    p("")
    p(f"slotgate log: {levels.get('ERROR', 0)} ERROR, {levels.get('WARN', 0)} WARN lines; "
      f"{panics} panics; {reloads} SIGHUP reloads logged (of {args.hups} sent); "
      f"{obl} output-buffer-limit closes")
    if panics:
        failures.append(f"{panics} panics in slotgate's log")
    if reloads < args.hups:
        warnings.append(f"{args.hups} SIGHUPs sent but {reloads} reloads logged")
    kinds = collections.Counter(
        (m.group(1), re.sub(r"\d+", "N", m.group(2))[:150])
        for m in re.finditer(r"Z\s+(ERROR|WARN)\s+(.*)", log))
    for (level, t), n in kinds.most_common(8):
        p(f"  {level} x{n}: {t}")

    p("")
    for w in warnings:
        p(f"warning: {w}")
    if failures:
        for f in failures:
            p(f"FAIL: {f}")
    else:
        p("PASS: slotgate stayed up, RSS flat after warm-up, fds back down after traffic")
    text = "\n".join(out)
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--duration", type=float, required=True)
    d.add_argument("--stats", required=True)
    d.add_argument("--seed", default="soak")
    d.add_argument("--clock-offset", type=float, default=0)
    r = sub.add_parser("report")
    r.add_argument("--csv", required=True)
    r.add_argument("--stats", required=True)
    r.add_argument("--log", required=True)
    r.add_argument("--summary")
    r.add_argument("--faults", default="")
    r.add_argument("--duration", type=int, required=True)
    r.add_argument("--warmup", type=int, required=True)
    r.add_argument("--settle", type=int, required=True)
    r.add_argument("--alive", type=int, required=True)
    r.add_argument("--death", default="")
    r.add_argument("--hups", type=int, default=0)
    r.add_argument("--rss-pct", type=float, default=25)
    r.add_argument("--rss-mib", type=float, default=64)
    r.add_argument("--fd-margin", type=int, default=16)
    a = ap.parse_args()
    if a.what == "drive":
        drive(a)
        return 0
    return report(a)


if __name__ == "__main__":
    sys.exit(main())
