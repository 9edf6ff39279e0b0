#!/usr/bin/env python3
"""Opens COUNT idle client connections to a RESP server and reports the server's RSS.

Each connection sends one PING and reads +PONG (so the server has set up the session, and the
TLS handshake is complete), then stays open and idle. The server's VmRSS is read from /proc
before and after; the connections are closed before exit.

    idle_conns.py --port 6380 --pid 1234 --count 10000 [--tls]
"""

import argparse
import resource
import socket
import ssl
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up after this many s")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.count + 64
    if soft < want:
        if hard < want:
            sys.exit(f"need {want} file descriptors, hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    ctx = None
    if a.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE

    before = rss_kib(a.pid)
    deadline = time.monotonic() + a.timeout
    conns = []
    try:
        for i in range(a.count):
            if time.monotonic() > deadline:
                sys.exit(f"timed out after {i} connections")
            s = socket.create_connection((a.host, a.port), timeout=10)
            if ctx is not None:
                s = ctx.wrap_socket(s)
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            got = b""
            while not got.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    sys.exit(f"connection {i} closed by the server")
                got += chunk
            if got != b"+PONG\r\n":
                sys.exit(f"connection {i}: unexpected reply {got!r}")
            conns.append(s)
        time.sleep(1.0)  # let the server settle (allocator, buffers)
        after = rss_kib(a.pid)
    finally:
        for s in conns:
            s.close()
    kind = "TLS" if a.tls else "plain"
    grown = (after - before) / 1024
    print(
        f"{a.count} idle {kind} connections: RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB "
        f"(+{grown:.1f} MiB, {1024 * grown / a.count:.2f} KiB per connection)"
    )


if __name__ == "__main__":
    main()
