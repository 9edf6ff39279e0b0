#!/usr/bin/env python3
"""End-to-end benchmark of slotgate, self-contained: `scripts/bench.sh [options]`.

Starts two plain redis-server shards and slotgate in front of them on free loopback ports,
plus a single redis-server as the reference ("direct"), fills the key space, and runs
redis-benchmark scenarios (50 clients, 100,000 random keys) against each system. For every
run it records requests/s and latency from redis-benchmark, and the CPU the system under
test spent (its threads' schedstat), so that figures are per request and comparable across
systems in the same run. Prints a markdown table of medians.

  --repeat N        medians of N runs per scenario and system (default 1)
  --quick           fewer requests per run
  --scenarios a,b   from: get_p1 set_p1 get_p16 set_p16 mget_p1 mset_p1 get4k_p1 set4k_p1,
                    and with --tls: get_p1_tls set_p1_tls get_p16_tls
  --no-direct       slotgate only (--no-anchors is accepted as a synonym)
  --tls             slotgate and the reference also serve TLS (a throw-away certificate)
  --callgrind       run slotgate under callgrind: user-space instructions per request
  --syscalls        count system calls per request with `perf stat` (a separate column)
  --bin PATH        the slotgate binary (default: target/release/slotgate, built first)
  --io MODES        slotgate's socket I/O, one system per mode: epoll, uring or epoll,uring
                    (default: epoll)
  --twemproxy       add twemproxy (nutcracker, from $NUTCRACKER_BIN or PATH: apt-get install
                    nutcracker) in front of the same shards, as an anchor
  --idle N          also open N idle connections to each proxy and report its resident memory
                    per connection
Environment: WORKERS (slotgate worker threads, default 1), CLIENTS (default 50), N_P1
(requests per unpipelined run; pipelined runs make 4 times as many), READTHROUGH=1 (add a system
"slotgate-rt" where every benchmark key is owned by a read-through rule, so GETs are hits).
Needs redis-server and redis-benchmark; valgrind for --callgrind; linux-perf for --syscalls.
"""

import argparse
import csv
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

KEYSPACE = 100_000
CLIENTS = int(os.environ.get("CLIENTS", "50"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (redis-benchmark arguments, pipeline, value size)
SCENARIOS = {
    "get_p1": (["-t", "get"], 1, 3),
    "set_p1": (["-t", "set"], 1, 3),
    "get_p16": (["-t", "get"], 16, 3),
    "set_p16": (["-t", "set"], 16, 3),
    "mget_p1": (["MGET"] + [f"key:{{{i}}}__rand_int__" for i in range(10)], 1, 3),
    "mset_p1": (["MSET"] + sum(([f"key:{{{i}}}__rand_int__", "v"] for i in range(10)), []), 1, 3),
    "get4k_p1": (["-t", "get"], 1, 4096),
    "set4k_p1": (["-t", "set"], 1, 4096),
    # 1,000 clients (the CLIENTS default is 50).
    "get_c1000": (["-t", "get"], 1, 3),
}
CLIENTS_OF = {"get_c1000": 1000}
for _n in ["get_p1", "set_p1", "get_p16"]:
    SCENARIOS[_n + "_tls"] = SCENARIOS[_n]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port} within {timeout}s")


def cpu_ns(pid):
    """CPU time of every thread of `pid`, in ns (first field of schedstat)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


class Procs:
    """Processes this run started: stopped by PID at the end, whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in reversed(self.procs):
            self.stop(p)


def redis_server(procs, tmp, tls=None):
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"]
    tls_port = None
    if tls:
        tls_port = free_port()
        args += ["--tls-port", str(tls_port), "--tls-cert-file", tls[0], "--tls-key-file", tls[1],
                 "--tls-auth-clients", "no"]
    p = procs.start(args)
    wait_port(port, p, "redis-server")
    return p, port, tls_port


def make_cert(tmp):
    crt, key = os.path.join(tmp, "bench.crt"), os.path.join(tmp, "bench.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", key, "-out", crt], check=True, capture_output=True)
    return crt, key


def benchmark(port, scenario, n, tls):
    args, pipeline, size = SCENARIOS[scenario]
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(CLIENTS_OF.get(scenario, CLIENTS)),
           "-n", str(n), "-r", str(KEYSPACE if size < 1000 else 10_000), "-P", str(pipeline),
           "-d", str(size), "--csv"]
    if tls:
        cmd += ["--tls", "--insecure"]
    cmd += args
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [r for r in csv.reader(io.StringIO(out)) if r and r[0] != "test"]
    if not rows:
        sys.exit(f"redis-benchmark printed nothing for {scenario}: {out!r}")
    r = rows[-1]
    # test, rps, avg, min, p50, p95, p99, max (redis-benchmark 7)
    return float(r[1]), float(r[4]), float(r[6])


def populate(port, size, keys):
    """Writes the first `keys` keys redis-benchmark reads (`key:__rand_int__`: 12 digits) with
    values of `size` bytes, so that every GET hits."""
    def resp(*args):
        out = [b"*%d\r\n" % len(args)]
        for x in args:
            out.append(b"$%d\r\n%s\r\n" % (len(x), x))
        return b"".join(out)

    with socket.create_connection(("127.0.0.1", port)) as s:
        value = b"x" * size
        for start in range(0, keys, 1000):
            batch = b"".join(resp(b"SET", b"key:%012d" % i, value) for i in range(start, min(keys, start + 1000)))
            s.sendall(batch)
            want, got = b"+OK\r\n" * (min(keys, start + 1000) - start), b""
            while len(got) < len(want):
                chunk = s.recv(65536)
                if not chunk:
                    sys.exit("connection closed while filling the key space")
                got += chunk
            if got != want:
                sys.exit(f"filling the key space failed: {got[:200]!r}")


class Callgrind:
    def __init__(self, pid, out_prefix):
        self.pid, self.prefix, self.n = pid, out_prefix, 0

    def zero(self):
        subprocess.run(["callgrind_control", "-z", str(self.pid)], capture_output=True)

    def dump_ir(self):
        subprocess.run(["callgrind_control", "-d", str(self.pid)], capture_output=True)
        self.n += 1
        path = f"{self.prefix}.{self.n}"
        deadline = time.time() + 30
        while time.time() < deadline:
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        if line.startswith(("totals:", "summary:")):
                            return int(line.split()[1])
            time.sleep(0.1)
        sys.exit(f"no callgrind dump at {path}")


def twemproxy(procs, tmp, shard_ports, binary):
    """nutcracker in front of the shards (crc16, modula: it splits MGET over them too)."""
    port, stats = free_port(), free_port()
    conf = os.path.join(tmp, "nutcracker.yml")
    with open(conf, "w") as f:
        f.write(f"bench:\n  listen: 127.0.0.1:{port}\n  hash: crc16\n  distribution: modula\n"
                f"  redis: true\n  timeout: 5000\n  servers:\n")
        for sp in shard_ports:
            f.write(f"   - 127.0.0.1:{sp}:1\n")
    p = procs.start([binary, "-c", conf, "-s", str(stats), "-o", os.path.join(tmp, "nutcracker.log")])
    wait_port(port, p, "nutcracker")
    return p, port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_cost(pid, port, n):
    """Resident memory per connection of `n` idle connections (each sent one PING first)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1000)), hard))
    before = rss_kib(pid)
    conns = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            conns.append(s)
        for s in conns:
            s.settimeout(10)
            if s.recv(16) != b"+PONG\r\n":
                sys.exit("an idle connection was not answered")
        time.sleep(0.5)
        return (rss_kib(pid) - before) * 1024 / n
    finally:
        for s in conns:
            s.close()


def syscalls_during(pid, fn):
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    result = fn()
    perf.send_signal(signal.SIGINT)
    err = perf.communicate(timeout=30)[1]
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and "sys_enter" in line and parts[0].strip().isdigit():
            return result, int(parts[0])
    return result, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scenarios", default=None)
    ap.add_argument("--no-direct", "--no-anchors", dest="no_direct", action="store_true")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--syscalls", action="store_true")
    ap.add_argument("--bin", default=None)
    ap.add_argument("--io", default="epoll")
    ap.add_argument("--twemproxy", action="store_true")
    ap.add_argument("--idle", type=int, default=0)
    a = ap.parse_args()

    default = [s for s in SCENARIOS if s.endswith("_tls")] if a.tls else [s for s in SCENARIOS if not s.endswith("_tls")]
    scenarios = a.scenarios.split(",") if a.scenarios else default
    for s in scenarios:
        if s not in SCENARIOS:
            sys.exit(f"unknown scenario {s}; known: {' '.join(SCENARIOS)}")
        if s.endswith("_tls") and not a.tls:
            sys.exit(f"{s} needs --tls")
    for tool in ["redis-server", "redis-benchmark"] + (["valgrind", "callgrind_control"] if a.callgrind else []) + (["perf"] if a.syscalls else []):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required (apt-get install -y redis-server redis-tools valgrind linux-perf)")
    binary = a.bin
    if binary is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        binary = os.path.join(ROOT, "target", "release", "slotgate")
    workers = os.environ.get("WORKERS", "1")

    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="slotgate-bench-")
    try:
        tls = make_cert(tmp) if a.tls else None
        shards = [redis_server(procs, tmp, None) for _ in range(2)]
        shard_list = ",".join(f"127.0.0.1:{p}" for _, p, _ in shards)
        systems = []  # (name, pid, plain port, tls port, callgrind)
        if not a.no_direct:
            d, port, tport = redis_server(procs, tmp, tls)
            systems.append(("direct", d.pid, port, tport, None))
        modes = a.io.split(",")
        for m in modes:
            if m not in ("epoll", "uring"):
                sys.exit(f"--io: unknown mode {m} (epoll, uring)")
        variants = [("slotgate" if len(modes) == 1 else f"slotgate-{m}", ["--io", m]) for m in modes]
        if os.environ.get("READTHROUGH") == "1":
            # The origin is never called: the fill below writes every key first.
            variants.append(("slotgate-rt", ["--readthrough", "key:=http://127.0.0.1:9/{rest}"]))
        for name, extra in variants:
            port = free_port()
            args = [binary, "--listen", f"127.0.0.1:{port}", "--shard-list", shard_list,
                    "--workers", workers, "--log-level", "warn", "--admin-listen", "none",
                    "--maxclients", str(max(10_000, a.idle + 2_000))] + extra
            tport = None
            if tls:
                tport = free_port()
                args += ["--tls-listen", f"127.0.0.1:{tport}", "--tls-cert", tls[0], "--tls-key", tls[1]]
            cg = None
            if a.callgrind:
                prefix = os.path.join(tmp, f"cg-{name}")
                args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}"] + args
            p = procs.start(args)
            wait_port(port, p, name, timeout=120 if a.callgrind else 20)
            if a.callgrind:
                cg = Callgrind(p.pid, prefix)
            systems.append((name, p.pid, port, tport, cg))
        if a.twemproxy:
            nut = os.environ.get("NUTCRACKER_BIN") or shutil.which("nutcracker")
            if not nut:
                sys.exit("--twemproxy: nutcracker not found (apt-get install -y nutcracker)")
            t, tport = twemproxy(procs, tmp, [p for _, p, _ in shards], nut)
            systems.append(("twemproxy", t.pid, tport, None, None))
        for name, _, port, _, _ in systems:
            populate(port, 3, KEYSPACE)

        base_n = int(os.environ.get("N_P1", "0")) or (20_000 if (a.quick or a.callgrind) else 100_000)
        results = {}  # (scenario, system) -> list of dicts
        for rep in range(a.repeat):
            for sc in scenarios:
                use_tls = sc.endswith("_tls")
                n = base_n * (4 if SCENARIOS[sc][1] > 1 else 1)
                big = SCENARIOS[sc][2] > 1000
                for name, pid, port, tport, cg in systems:
                    target = tport if use_tls else port
                    if big:
                        # The 4 KiB scenarios read the first 10,000 keys with 4 KiB values.
                        populate(port, 4096, 10_000)
                    if cg:
                        cg.zero()
                    c0 = cpu_ns(pid)
                    b0 = sum(cpu_ns(s.pid) for s, _, _ in shards)
                    if a.syscalls:
                        (rps, p50, p99), calls = syscalls_during(pid, lambda: benchmark(target, sc, n, use_tls))
                    else:
                        (rps, p50, p99), calls = benchmark(target, sc, n, use_tls), None
                    c1 = cpu_ns(pid)
                    b1 = sum(cpu_ns(s.pid) for s, _, _ in shards)
                    row = {"rps": rps, "p50": p50, "p99": p99, "cpu": (c1 - c0) / 1000 / n,
                           "backend": (b1 - b0) / 1000 / n if name != "direct" else None}
                    if calls is not None:
                        row["syscalls"] = calls / n
                    if cg:
                        row["ir"] = cg.dump_ir() / n
                    results.setdefault((sc, name), []).append(row)
                    if big:
                        populate(port, 3, 10_000)
                    print(f"[{rep + 1}/{a.repeat}] {sc:12} {name:12} {rps:10.0f} rps  cpu {row['cpu']:7.2f} us/req"
                          + (f"  Ir {row['ir']:8.0f}/req" if "ir" in row else ""), file=sys.stderr)
        print_table(results, scenarios, [s[0] for s in systems], a)
        if a.idle:
            print(f"\n{a.idle} idle connections: resident memory per connection")
            print("| system | bytes/connection |\n|---|---:|")
            for name, pid, port, _, _ in systems:
                print(f"| {name} | {idle_cost(pid, port, a.idle):,.0f} |")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def print_table(results, scenarios, names, a):
    cols = ["rps", "x direct", "p50 ms", "p99 ms", "CPU µs/req", "backend µs/req"]
    if "twemproxy" in names:
        cols.insert(5, "CPU x twemproxy")
    if a.syscalls:
        cols.append("syscalls/req")
    if a.callgrind:
        cols.append("Ir/req (slotgate under callgrind)")
    print(f"\nslotgate benchmark: 2 shards, {CLIENTS} clients, WORKERS={os.environ.get('WORKERS', '1')}, "
          f"medians of {a.repeat}" + (" (rps and CPU under valgrind are not meaningful)" if a.callgrind else ""))
    print("| scenario | system | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for sc in scenarios:
        direct = med(results.get((sc, "direct"), []), "rps")
        twem = med(results.get((sc, "twemproxy"), []), "cpu")
        for name in names:
            rows = results.get((sc, name), [])
            rps = med(rows, "rps")
            cells = [f"{rps:.0f}", f"{rps / direct:.2f}" if direct else "-", f"{med(rows, 'p50'):.3f}",
                     f"{med(rows, 'p99'):.3f}", f"{med(rows, 'cpu'):.2f}"]
            if "twemproxy" in names:
                cells.append(f"{med(rows, 'cpu') / twem:.2f}" if twem and name != "direct" else "-")
            b = med(rows, "backend")
            cells.append(f"{b:.2f}" if b is not None else "-")
            if a.syscalls:
                s = med(rows, "syscalls")
                cells.append(f"{s:.2f}" if s is not None else "-")
            if a.callgrind:
                ir = med(rows, "ir")
                cells.append(f"{ir:,.0f}" if ir is not None else "-")
            print(f"| {sc} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
