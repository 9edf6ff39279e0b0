#!/usr/bin/env python3
"""What client-side caching costs slotgate per GET: user-space instructions (callgrind) of
unpipelined RESP3 GETs of distinct keys from a client without CLIENT TRACKING and from one
with it, each run's counters zeroed before and dumped after it.

Usage: scripts/tracking_cost.py [--bin target/release/slotgate] [--gets 20000] [--repeat 3]

Starts its own redis-server and slotgate (one worker, under valgrind) on free loopback
ports, and stops them. Needs valgrind (callgrind_control) and redis-server.
"""
import argparse, glob, os, socket, subprocess, sys, tempfile, time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, within=60):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def drive(port, tracking, n):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")

    def cmd(*a):
        s.sendall(b"*%d\r\n" % len(a) + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in a))

    def reply():
        line = f.readline()
        t = line[:1]
        if t == b"$":
            size = int(line[1:-2])
            if size >= 0:
                f.read(size + 2)
        elif t in (b"%", b"*", b">", b"~"):
            for _ in range(int(line[1:-2]) * (2 if t == b"%" else 1)):
                reply()
            if t == b">":  # a push: the reply follows
                return reply()
        return line

    cmd(b"HELLO", b"3")
    reply()
    if tracking:
        cmd(b"CLIENT", b"TRACKING", b"ON")
        reply()
    for i in range(n):
        cmd(b"GET", b"key:%d" % (i % 50000))
        reply()
    s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/slotgate")
    ap.add_argument("--gets", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tracking-cost-")
    shard_port, port = free_port(), free_port()
    shard = subprocess.Popen(["redis-server", "--port", str(shard_port), "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    wait_port(shard_port)
    out = os.path.join(tmp, "cg.%p")
    sg = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                           args.bin, "--listen", f"127.0.0.1:{port}", "--shard-list",
                           f"127.0.0.1:{shard_port}", "--workers", "1", "--log-level", "warn",
                           "--admin-listen", "none"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        drive(port, False, 2000)  # warm-up
        for rep in range(args.repeat):
            for tracking in (False, True):
                subprocess.run(["callgrind_control", "-z", str(sg.pid)], capture_output=True)
                drive(port, tracking, args.gets)
                name = f"{'tracking' if tracking else 'plain'}{rep}"
                subprocess.run(["callgrind_control", "-d", name, str(sg.pid)], capture_output=True)
                dump = max(glob.glob(os.path.join(tmp, f"cg.{sg.pid}.*")), key=os.path.getmtime)
                with open(dump) as d:
                    total = next(int(l.split()[1]) for l in d
                                 if l.startswith(("summary:", "totals:")))
                label = "with CLIENT TRACKING" if tracking else "without tracking    "
                print(f"run {rep + 1}: {label} {total // args.gets:>6} instructions per GET")
    finally:
        sg.terminate()
        sg.wait()
        shard.terminate()
        shard.wait()


if __name__ == "__main__":
    main()
