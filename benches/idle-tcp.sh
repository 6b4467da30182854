#!/usr/bin/env bash
# Memory per idle opaque TCP connection: nginx (stream), HAProxy (mode tcp) and Remora
# (benches/peers/tcp.yaml, spliced), each alone on CPU 1, side by side in one run. The peer kit's
# peers-conns.sh has HTTP/1.1 and HTTP/2 modes only; this is its TCP case, built from the kit's
# own TCP proxy configs (18101, 18102; Remora on 18103) and client: N connections each carry one
# HTTP/1.1 request through the L4 proxy to an nginx origin on 18100 (the kit's backend, moved to
# the TCP configs' upstream port), read the answer, and stay open and idle. Prints, per proxy, its
# RSS growth divided by N.
#
# Usage: benches/idle-tcp.sh     Env: N=5000, PEERS_DIR, REMORA (see kit.sh)
set -u
. "$(dirname "$0")/kit.sh"
# Each proxied connection holds two descriptors in the proxy, and one in the origin.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
N=${N:-5000}
limit=$((N * 2 + 1000))   # descriptors (nginx's worker_connections count both sides)
sed -e 's/127.0.0.1:18080/127.0.0.1:18100/' -e "s/worker_connections 4096/worker_connections $limit/" \
  -e 's|/tmp/bench-backend.pid|/tmp/bench-backend-tcp.pid|' "$BENCH_DIR/backend-nginx.conf" > /tmp/bench-idle-tcp-origin.conf
sed "s/worker_connections 4096/worker_connections $limit/" "$BENCH_DIR/proxy-nginx-tcp.conf" > /tmp/bench-idle-tcp-nginx.conf
sed "s/maxconn 4000/maxconn $((N + 500))/" "$BENCH_DIR/proxy-haproxy-tcp.cfg" > /tmp/bench-idle-tcp-haproxy.cfg
taskset -c 0 nginx -c /tmp/bench-idle-tcp-origin.conf >/dev/null 2>&1 &
wait_port 18100
run() { printf "%-10s " "$1"; python3 "$BENCH_DIR/idle_conns.py" "$2" "$3" "$N"; }
taskset -c 1 nginx -c /tmp/bench-idle-tcp-nginx.conf >/dev/null 2>&1 & P=$!; wait_port 18101
run nginx 18101 $P; kill $P; wait $P 2>/dev/null
taskset -c 1 haproxy -f /tmp/bench-idle-tcp-haproxy.cfg >/dev/null 2>&1 & P=$!; wait_port 18102
run haproxy 18102 $P; kill $P; wait $P 2>/dev/null
taskset -c 1 "$remora" proxy --config "$root/benches/peers/tcp.yaml" >/tmp/bench-idle-tcp-remora.log 2>&1 & P=$!
wait_port 18103
run remora 18103 $P; kill $P; wait $P 2>/dev/null
