#!/usr/bin/env bash
# Does memory come back after a flood of connections that all closed? Remora (one worker, alone on
# CPU 1, benches/peers/h1.yaml or h2.yaml) in front of the peer kit's nginx backend: 16 connections
# stay open throughout (a client pool that lives on), N more each make one request, stay open and
# idle for a second, then all close at once; the proxy's RSS is read before, while they are held,
# and every 5 s for SETTLE seconds after they closed (benches/support/flood.py).
#
# Usage: benches/flood-return.sh     Env: MODE=h1|h2 (default h1), N=5000, SETTLE=15, PEERS_DIR, REMORA
set -u
. "$(dirname "$0")/kit.sh"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
MODE=${MODE:-h1}; N=${N:-5000}; SETTLE=${SETTLE:-15}
if [ "$MODE" = h2 ]; then config=h2; port=18093; else config=h1; port=18083; fi
taskset -c 1 "$remora" proxy --config "$root/benches/peers/$config.yaml" >/tmp/bench-flood-remora.log 2>&1 & P=$!
wait_port $port
python3 "$root/benches/support/flood.py" "$MODE" $port $P "$N" "$SETTLE"
kill $P; wait $P 2>/dev/null
