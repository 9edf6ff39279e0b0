#!/usr/bin/env python3
"""Generates src/command/table.rs from a running redis-server's COMMAND reply.

Regenerate (from the repository root, with a Redis 7.0 server on a spare port):
    redis-server --port 7998 --save '' --appendonly no &
    scripts/gen_command_table.py --port 7998
    kill %1

Usage:
    scripts/gen_command_table.py [--host 127.0.0.1] [--port 6379] [--out src/command/table.rs]

Stdlib only: speaks RESP2 over a plain socket. Rows get their name, arity, flags, key specs
and subcommands from Redis; the proxy's Route of each row comes from the lists below. After
writing, the file is formatted with `rustfmt --edition 2024` (skipped with a warning if
rustfmt is missing). Commands that fall into "keyless default -> Refused" are printed to
stderr for review.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys

# --------------------------------------------------------------------------------------------
# Routes. Names are lower-case, subcommands spelled `container|sub` as Redis does. A name
# listed with FAMILY semantics (see `FAMILIES`) also covers every subcommand of that container.
# --------------------------------------------------------------------------------------------

# Answered by the proxy itself: connection state, introspection, cluster emulation.
LOCAL = [
    "ping", "echo", "quit", "reset", "hello", "select", "auth", "time", "info",
    "command",  # + all its subcommands (see FAMILIES)
    "config|get", "config|help",
    "client|setname", "client|getname", "client|id", "client|setinfo", "client|info",
    "client|list", "client|no-evict", "client|no-touch", "client|help",
    "cluster",  # + every cluster subcommand (see FAMILIES)
    "readonly", "readwrite", "asking",
    "acl|whoami",
    "client|kill", "client|reply",
    # Proxy-wide: MONITOR sees every client of slotgate; CLIENT PAUSE holds them all;
    # CLIENT UNBLOCK reaches the shard a client of slotgate is blocked on.
    "monitor", "client|pause", "client|unpause", "client|unblock",
    # Client-side caching: tracked by the proxy (see `tracking`).
    "client|tracking", "client|trackinginfo", "client|caching", "client|getredir",
]

# Multi-key commands split per shard, replies merged.
SCATTER = {
    "mget": "ArrayInOrder",
    "mset": "AllOk",
    "del": "SumIntegers",
    "exists": "SumIntegers",
    "unlink": "SumIntegers",
    "touch": "SumIntegers",
}

# Sent to every shard, replies merged.
ALL_SHARDS = {
    "dbsize": "SumIntegers",
    "keys": "ConcatArrays",
    "flushdb": "AllOk",
    "flushall": "AllOk",
    "config|set": "AllOk",
    "config|resetstat": "AllOk",
    "scan": "Scan",
    "randomkey": "RandomKey",
    # Scripts and functions are loaded on every shard, so a script loaded once can run for
    # any key (no NOSCRIPT for a script loaded through slotgate).
    "script|load": "Same",
    "script|exists": "AndIntArrays",
    "script|flush": "AllOk",
    "script|kill": "AnyOk",
    # The shards' slow logs, merged newest first (each entry names its shard).
    "slowlog|get": "SlowlogEntries",
    "slowlog|len": "SlowlogLen",
    "slowlog|reset": "AllOk",
    # The shards' latency monitors: LATEST's events named with their shard, HISTORY's samples
    # in time order, DOCTOR's reports one after the other, RESET's counts summed.
    "latency|latest": "LatencyLatest",
    "latency|history": "LatencyHistory",
    "latency|doctor": "LatencyDoctor",
    "latency|reset": "SumIntegers",
    "function|load": "Same",
    "function|delete": "AllOk",
    "function|flush": "AllOk",
    "function|restore": "AllOk",
    "function|kill": "AnyOk",
}

# Keyless and harmless on any shard: sent to the first one.
ANY_SHARD = [
    "lolwut", "lastsave", "role",
    "memory|doctor", "memory|stats", "memory|malloc-stats", "memory|help",
    "object|help", "xinfo|help", "xgroup|help", "latency|help", "slowlog|help",
    "script|help", "function|help", "function|list", "function|dump", "function|stats",
]

# MULTI/EXEC/DISCARD/WATCH/UNWATCH: a transaction pinned to a dedicated connection.
TRANSACTION = ["multi", "exec", "discard", "watch", "unwatch"]

# Blocking commands: each gets a dedicated connection for its duration (XREAD/XREADGROUP are
# Single and take this path when they carry BLOCK).
BLOCKING = [
    "blpop", "brpop", "blmove", "brpoplpush", "blmpop", "bzpopmin", "bzpopmax", "bzmpop",
    "wait",
]

# Stateful families served by a later version: transactions, pub/sub, scripting, blocking,
# replication waits, MONITOR, client-side caching and connection control.
NOT_YET = []

# Pub/sub: subscriptions on dedicated connections, PUBLISH and PUBSUB introspection on the
# designated shard (sharded channels by slot).
PUBSUB = [
    "subscribe", "psubscribe", "unsubscribe", "punsubscribe", "ssubscribe", "sunsubscribe",
    "publish",
    "pubsub",  # + subcommands (see FAMILIES)
]

# Would break the proxy's model (server lifecycle, replication, persistence, cross-db moves,
# modules, ACL changes, debugging): refused.
REFUSED = [
    "shutdown", "debug", "replicaof", "slaveof", "config|rewrite",
    "module",  # + subcommands (see FAMILIES)
    "migrate",
    "acl",  # + all subcommands except acl|whoami (see FAMILIES)
    "save", "bgsave", "bgrewriteaof", "failover", "sync", "psync", "replconf", "swapdb",
    "move", "pfdebug", "pfselftest",
    "latency", "slowlog",  # + subcommands except help (see FAMILIES)
    "memory|purge",
    "script|debug",
]

# Containers whose route also applies to every subcommand that is not listed explicitly.
FAMILIES = ["command", "cluster", "pubsub", "script", "function", "module", "acl",
            "latency", "slowlog"]

# Rows the 7.0 server lacks but that clients send (Redis 7.2 added them):
# (name, arity, flags, route). Both answered locally.
SYNTHETIC = [
    # CLIENT SETINFO <LIB-NAME libname | LIB-VER libver>
    ("client|setinfo", 4, ["noscript", "loading", "stale"], ["@slow", "@connection"]),
    # CLIENT NO-TOUCH <ON | OFF>
    ("client|no-touch", 3, ["noscript", "loading", "stale"], ["@slow", "@connection"]),
]

# slotgate's own commands (not Redis's), answered by the proxy: (name, arity, flags, ACL
# categories, key specs). SLOTGATE.INVALIDATE deletes keys and their read-through state;
# SLOTGATE.STATUS reports a key's read-through state; SLOTGATE.RELOAD reloads the configuration
# (admins only: @admin, @dangerous); SLOTGATE.HOTKEYS and SLOTGATE.BIGKEYS list the keys
# requested most and the largest replies (filtered by the user's key patterns).
PROXY_COMMANDS = [
    ("slotgate.invalidate", -2, ["write"], ["@write", "@keyspace", "@slow"],
     ["KeySpec { access: access::WRITE, begin: BeginSearch::Index(1), "
      "find: FindKeys::Range { lastkey: -1, keystep: 1, limit: 0 } }"]),
    ("slotgate.status", 2, ["readonly"], ["@read", "@keyspace", "@slow"],
     ["KeySpec { access: access::READ, begin: BeginSearch::Index(1), "
      "find: FindKeys::Range { lastkey: 0, keystep: 1, limit: 0 } }"]),
    ("slotgate.reload", 1, ["admin", "noscript"], ["@admin", "@slow", "@dangerous"], []),
    ("slotgate.hotkeys", -1, ["readonly", "loading", "stale"], ["@read", "@slow"], []),
    ("slotgate.bigkeys", -1, ["readonly", "loading", "stale"], ["@read", "@slow"], []),
]

# Key specs replaced by hand: (command, spec index) -> (Rust KeySpec, the Redis spec it replaces).
# SORT's STORE destination is an "unknown" spec in Redis 7.0 (STORE may appear anywhere), which
# Redis resolves with its own `sortGetKeys`. Skipping it would route `SORT k STORE dst` by `k`
# alone and write `dst` on the wrong shard, so it is approximated by a keyword search for the
# first STORE after the source key (wrong only if a BY/GET pattern is literally "store").
KEYSPEC_OVERRIDES = {
    ("sort", 2): (
        'KeySpec { access: access::WRITE, '
        'begin: BeginSearch::Keyword { keyword: "STORE", startfrom: 2 }, '
        'find: FindKeys::Range { lastkey: 0, keystep: 1, limit: 0 } }',
        "KeySpec { access: access::WRITE, begin: BeginSearch::Unknown, find: FindKeys::Unknown }",
    ),
}

# Redis flag -> `flags::*` const. Flags without a const are ignored.
FLAG_CONSTS = {
    "write": "WRITE",
    "readonly": "READONLY",
    "denyoom": "DENYOOM",
    "admin": "ADMIN",
    "pubsub": "PUBSUB",
    "noscript": "NOSCRIPT",
    "blocking": "BLOCKING",
    "loading": "LOADING",
    "stale": "STALE",
    "no_auth": "NO_AUTH",
    "fast": "FAST",
    "movablekeys": "MOVABLEKEYS",
    "no_multi": "NO_MULTI",
    "allow_busy": "ALLOW_BUSY",
    "may_replicate": "MAY_REPLICATE",
}

# Commands Redis flags MAY_REPLICATE in its command JSON files; Redis 7.0's COMMAND reply does
# not show that flag, so it is added here. CLIENT PAUSE WRITE holds them like writes.
MAY_REPLICATE = ["eval", "evalsha", "fcall", "pfcount", "publish", "spublish"]


# Redis ACL category -> `acl::*` const (all 21 categories of Redis 7.0).
ACL_CONSTS = {
    "@keyspace": "KEYSPACE", "@read": "READ", "@write": "WRITE", "@set": "SET",
    "@sortedset": "SORTEDSET", "@list": "LIST", "@hash": "HASH", "@string": "STRING",
    "@bitmap": "BITMAP", "@hyperloglog": "HYPERLOGLOG", "@geo": "GEO", "@stream": "STREAM",
    "@pubsub": "PUBSUB", "@admin": "ADMIN", "@fast": "FAST", "@slow": "SLOW",
    "@blocking": "BLOCKING", "@dangerous": "DANGEROUS", "@connection": "CONNECTION",
    "@transaction": "TRANSACTION", "@scripting": "SCRIPTING",
}


def acl_expr(names):
    unknown = [n for n in names if n not in ACL_CONSTS]
    if unknown:
        raise SystemExit("unknown ACL categories %r: add them to ACL_CONSTS" % unknown)
    if not names:
        return "0"
    return " | ".join("acl::" + ACL_CONSTS[n] for n in names)


def access_expr(flags):
    """Key-spec flags -> the permissions a key needs (Redis 7.0 ACLSelectorCheckKey)."""
    f = {x.lower() for x in flags}
    parts = []
    if "access" in f:
        parts.append("access::READ")
    if f & {"insert", "update", "delete"}:
        parts.append("access::WRITE")
    return " | ".join(parts) or "0"


# --------------------------------------------------------------------------------------------
# RESP2 client (just enough for COMMAND and INFO).
# --------------------------------------------------------------------------------------------

class RespError(Exception):
    pass


class Resp:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a.encode() if isinstance(a, str) else a
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RespError("connection closed")
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RespError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode()
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RespError("unexpected reply type %r" % t)


def pairs(flat):
    """A RESP2 flat key/value array as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


# --------------------------------------------------------------------------------------------
# Conversion.
# --------------------------------------------------------------------------------------------

def rust_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def key_spec(raw):
    spec = pairs(raw)
    bs = pairs(spec["begin_search"])
    fk = pairs(spec["find_keys"])
    bs_spec = pairs(bs["spec"]) if bs.get("spec") else {}
    fk_spec = pairs(fk["spec"]) if fk.get("spec") else {}
    if bs["type"] == "index":
        begin = "BeginSearch::Index(%d)" % bs_spec["index"]
    elif bs["type"] == "keyword":
        begin = "BeginSearch::Keyword { keyword: %s, startfrom: %d }" % (
            rust_str(bs_spec["keyword"]), bs_spec["startfrom"])
    elif bs["type"] == "unknown":
        begin = "BeginSearch::Unknown"
    else:
        raise SystemExit("unexpected begin_search type %r" % bs["type"])
    if fk["type"] == "range":
        find = "FindKeys::Range { lastkey: %d, keystep: %d, limit: %d }" % (
            fk_spec["lastkey"], fk_spec["keystep"], fk_spec["limit"])
    elif fk["type"] == "keynum":
        find = "FindKeys::Keynum { keynumidx: %d, firstkey: %d, keystep: %d }" % (
            fk_spec["keynumidx"], fk_spec["firstkey"], fk_spec["keystep"])
    elif fk["type"] == "unknown":
        find = "FindKeys::Unknown"
    else:
        raise SystemExit("unexpected find_keys type %r" % fk["type"])
    return "KeySpec { access: %s, begin: %s, find: %s }" % (
        access_expr(spec.get("flags", [])), begin, find)


def flags_expr(names):
    consts = [FLAG_CONSTS[f] for f in names if f in FLAG_CONSTS]
    if not consts:
        return "0"
    return " | ".join("flags::" + c for c in consts)


def key_specs(name, raw_specs):
    specs = [key_spec(k) for k in raw_specs]
    for i, spec in enumerate(specs):
        override = KEYSPEC_OVERRIDES.get((name, i))
        if override:
            replacement, expected = override
            if spec != expected:
                raise SystemExit("override of %s spec %d expects %s, Redis has %s" % (
                    name, i, expected, spec))
            specs[i] = replacement
    return specs


def parse_command(raw):
    """One COMMAND reply entry as a dict (subcommands parsed recursively)."""
    name = raw[0].lower()
    return {
        "name": name,
        "arity": raw[1],
        "flags": [f.lower() for f in raw[2]],
        "acl": [a.lower() for a in raw[6]],
        "key_specs": key_specs(name, raw[8] if len(raw) > 8 else []),
        "subcommands": sorted((parse_command(s) for s in (raw[9] if len(raw) > 9 else [])),
                              key=lambda c: c["name"].encode()),
    }


def merge_expr(kind):
    return "Merge::" + kind


def build_routes():
    """name -> route expression, from the explicit lists; detects duplicates."""
    routes = {}

    def put(name, route):
        if name in routes and routes[name] != route:
            raise SystemExit("%s listed twice (%s, %s)" % (name, routes[name], route))
        routes[name] = route

    for n in LOCAL:
        put(n, "Route::Local")
    for n, m in SCATTER.items():
        put(n, "Route::Scatter(%s)" % merge_expr(m))
    for n, m in ALL_SHARDS.items():
        put(n, "Route::AllShards(%s)" % merge_expr(m))
    for n in ANY_SHARD:
        put(n, "Route::AnyShard")
    for n in NOT_YET:
        put(n, "Route::NotYet")
    for n in TRANSACTION:
        put(n, "Route::Transaction")
    for n in PUBSUB:
        put(n, "Route::PubSub")
    for n in BLOCKING:
        put(n, "Route::Blocking")
    for n in REFUSED:
        put(n, "Route::Refused")
    return routes


def assign_routes(commands, routes, keyless_refused):
    known = set()
    for c in commands:
        known.add(c["name"])
        for s in c["subcommands"]:
            known.add(s["name"])
    unknown = sorted(set(routes) - known)
    if unknown:
        raise SystemExit("route lists name unknown commands: %s" % ", ".join(unknown))

    for c in commands:
        name = c["name"]
        if name in routes:
            c["route"] = routes[name]
        elif c["subcommands"]:
            # A container row: the session routes by the subcommand row anyway.
            c["route"] = "Route::Single"
        elif c["key_specs"]:
            c["route"] = "Route::Single"
        else:
            c["route"] = "Route::Refused"
            keyless_refused.append(name)
        for s in c["subcommands"]:
            if s["name"] in routes:
                s["route"] = routes[s["name"]]
            elif name in FAMILIES:
                s["route"] = c["route"]
            elif s["key_specs"]:
                s["route"] = "Route::Single"
            else:
                s["route"] = "Route::Refused"
                keyless_refused.append(s["name"])


def emit_row(c, out, indent):
    pad = " " * indent
    out.append(pad + "CommandSpec {")
    out.append(pad + "    name: %s," % rust_str(c["name"]))
    out.append(pad + "    arity: %d," % c["arity"])
    extra = ["may_replicate"] if c["name"] in MAY_REPLICATE else []
    out.append(pad + "    flags: %s," % flags_expr(list(c["flags"]) + extra))
    out.append(pad + "    acl: %s," % acl_expr(c["acl"]))
    if c["key_specs"]:
        out.append(pad + "    key_specs: &[%s]," % ", ".join(c["key_specs"]))
    else:
        out.append(pad + "    key_specs: &[],")
    out.append(pad + "    route: %s," % c["route"])
    if c["subcommands"]:
        out.append(pad + "    subcommands: &[")
        for s in c["subcommands"]:
            emit_row(s, out, indent + 8)
        out.append(pad + "    ],")
    else:
        out.append(pad + "    subcommands: &[],")
    out.append(pad + "},")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6379)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "src", "command", "table.rs"))
    args = ap.parse_args()

    conn = Resp(args.host, args.port)
    info = conn.call("INFO", "server")
    version = "unknown"
    for line in info.splitlines():
        if line.startswith("redis_version:"):
            version = line.split(":", 1)[1].strip()
    commands = [parse_command(raw) for raw in conn.call("COMMAND")]

    names = [c["name"] for c in commands]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate command names in COMMAND reply")
    by_name = {c["name"]: c for c in commands}

    # Synthetic rows (Redis 7.2 subcommands a 7.0 server lacks).
    for name, arity, flag_names, acl_names in SYNTHETIC:
        container = by_name[name.split("|", 1)[0]]
        if any(s["name"] == name for s in container["subcommands"]):
            continue  # the server knows it: keep the real row
        container["subcommands"].append({
            "name": name, "arity": arity, "flags": flag_names, "acl": acl_names, "key_specs": [],
            "subcommands": [], "synthetic": True,
        })
        container["subcommands"].sort(key=lambda c: c["name"].encode())

    commands.sort(key=lambda c: c["name"].encode())

    keyless_refused = []
    assign_routes(commands, build_routes(), keyless_refused)

    for name, arity, flag_names, acl_names, specs in PROXY_COMMANDS:
        if name in by_name:
            raise SystemExit("%s is a Redis command too" % name)
        commands.append({
            "name": name, "arity": arity, "flags": flag_names, "acl": acl_names,
            "key_specs": specs, "subcommands": [], "route": "Route::Local",
        })
    commands.sort(key=lambda c: c["name"].encode())

    nsub = sum(len(c["subcommands"]) for c in commands)
    out = [
        "// @generated by `scripts/gen_command_table.py --host %s --port %d`" % (args.host, args.port),
        "// from the COMMAND reply of Redis %s (%d commands, %d subcommands)." % (
            version, len(commands), nsub),
        "// DO NOT EDIT BY HAND: change the route lists in the script and regenerate.",
        "// Key specs replaced by the script (see KEYSPEC_OVERRIDES): %s." % (
            ", ".join("%s #%d" % k for k in sorted(KEYSPEC_OVERRIDES)) or "none"),
        "",
        "//! The generated command table (see `scripts/gen_command_table.py`).",
        "",
        "use super::{BeginSearch, CommandSpec, FindKeys, KeySpec, Merge, Route, access, acl, flags};",
        "",
        "/// Every Redis command, sorted by name (byte order), for binary search.",
        "pub static COMMANDS: &[CommandSpec] = &[",
    ]
    for c in commands:
        emit_row(c, out, 4)
    out.append("];")
    text = "\n".join(out) + "\n"

    # Imports unused by this server's table would warn.
    for ident in ("BeginSearch", "FindKeys", "KeySpec", "Merge"):
        if (ident + "::") not in text and (ident + " {") not in text:
            text = text.replace(" %s," % ident, "", 1)

    with open(args.out, "w") as f:
        f.write(text)

    rustfmt = shutil.which("rustfmt")
    if rustfmt:
        subprocess.run([rustfmt, "--edition", "2024", args.out], check=True)
    else:
        print("warning: rustfmt not found, %s left unformatted" % args.out, file=sys.stderr)

    print("wrote %s: %d commands, %d subcommands, Redis %s" % (
        args.out, len(commands), nsub, version), file=sys.stderr)
    print("keyless default -> Refused (%d), review:" % len(keyless_refused), file=sys.stderr)
    for name in keyless_refused:
        print("  " + name, file=sys.stderr)
    if not keyless_refused:
        print("  (none: every keyless command is in an explicit list)", file=sys.stderr)


if __name__ == "__main__":
    main()
