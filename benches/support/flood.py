#!/usr/bin/env python3
"""A flood of connections that all close: 16 connections open and stay open (a pool that lives on),
then N more each make one request (HTTP/1.1 keep-alive, or HTTP/2 prior knowledge with MODE h2),
stay open and idle for a second, and all close at once. Prints the proxy's RSS (KiB) before the
flood, while it was held, and every 5 s for SETTLE seconds after it closed.
usage: flood.py h1|h2 PORT PID N SETTLE"""
import socket, sys, time

mode, port, pid, n, settle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])


def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


def h1():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
    while length and len(rest) < length[0]:
        rest += s.recv(4096)
    return s, head.startswith(b"HTTP/1.1 200")


def h2():
    import h2.config, h2.connection, h2.events
    s = socket.create_connection(("127.0.0.1", port))
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    c.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "bench")], end_stream=True)
    s.sendall(c.data_to_send())
    ok = done = False
    while not done:
        data = s.recv(65536)
        if not data:
            break
        for event in c.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                ok = dict(event.headers).get(":status") == "200"
            if isinstance(event, h2.events.StreamEnded):
                done = True
        s.sendall(c.data_to_send())
    return s, ok


one = h2 if mode == "h2" else h1
pool = [one()[0] for _ in range(16)]
time.sleep(0.5)
before = rss()
flood, ok = [], 0
for _ in range(n):
    s, good = one()
    flood.append(s)
    ok += good
time.sleep(1.0)
held = rss()
for s in flood:
    s.close()
after = []
for t in range(1, settle + 1):
    time.sleep(1)
    if t % 5 == 0:
        after.append(f"{t}s={rss()}")
last = rss()
print(f"{mode}: {ok} of {n} answered 200; RSS before {before} KiB, held {held} KiB, after closing: {' '.join(after)} KiB;"
      f" {(last - before) * 100 / before:+.1f}% against before")
