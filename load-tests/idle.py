#!/usr/bin/env python3
"""Memory per client connection, from outside: opens N connections to a front and holds them
in one of three ways, sampling the front's RSS every 100 ms, then closes them.

  idle.py PORT PID N MODE SECONDS
    MODE silent:    connect, send nothing
         trickle:   send a request head one header line every 2 s (never the end)
         keepalive: one request answered, then idle

Prints one line: `MODE N before_kib peak_kib kib_per_conn normal_ms`, where normal_ms is the
slowest of the normal requests made every 500 ms while the connections are held (-1: one
failed or took over 5 s). Bounded: SECONDS of holding, then everything is closed.
"""
import resource
import socket
import sys
import time

port, pid, n, mode, seconds = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4],
                               float(sys.argv[5]))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))


def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def normal():
    t = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = s.recv(64)
        s.close()
        if not got.startswith(b"HTTP/1.1 200"):
            return -1
    except OSError:
        return -1
    return (time.monotonic() - t) * 1000


before = rss()
peak = before
socks = []
for i in range(n):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        break
    if mode == "keepalive":
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(4096)
    elif mode == "trickle":
        s.sendall(b"GET / HTTP/1.1\r\n")
    s.setblocking(False)
    socks.append(s)
    if i % 500 == 0:
        peak = max(peak, rss())
worst = 0.0
start = time.monotonic()
next_line = start + 2
next_normal = start
line = 0
while time.monotonic() - start < seconds:
    now = time.monotonic()
    if mode == "trickle" and now >= next_line:
        line += 1
        for s in socks:
            try:
                s.send(b"X-Line-%d: %s\r\n" % (line, b"a" * 40))
            except OSError:
                pass
        next_line += 2
    if now >= next_normal:
        ms = normal()
        worst = -1 if ms < 0 or worst < 0 else max(worst, ms)
        next_normal += 0.5
    peak = max(peak, rss())
    time.sleep(0.1)
per = (peak - before) / max(len(socks), 1)
print(f"{mode} {len(socks)} {before} {peak} {per:.1f} {worst:.0f}")
for s in socks:
    s.close()
