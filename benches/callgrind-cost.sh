#!/usr/bin/env bash
# Instructions per request, per thread, of Remora under callgrind on the peer scenarios: for each
# config named (files in benches/peers/, default: h1 h1-trace-1pct h1-trace-all), Remora runs under
# valgrind against the peer kit's nginx backend (and the OTLP sink of otlp-sink-nginx.conf), wrk
# sends 15 s of keep-alive requests over 8 connections (for `h2`, h2load sends them over 8 HTTP/2
# connections, one stream at a time), and the user-space instructions of each Remora thread are
# divided by the requests served. Counting instructions does not see this machine's timing noise,
# so small costs show.
#
# Usage: benches/callgrind-cost.sh [CONFIG...]        Env: PEERS_DIR, REMORA (as peers.sh)
set -u
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
. "$(dirname "$0")/kit.sh"
[ $# -gt 0 ] || set -- h1 h1-trace-1pct h1-trace-all
# `remora proxy` starts itself again with glibc's thread cache tuned unless GLIBC_TUNABLES sets it
# (docs/cli.md), and a program started again under valgrind runs outside it: set it here, as the
# proxy would.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.tcache_count*) ;;
  "") export GLIBC_TUNABLES=glibc.malloc.tcache_count=4 ;;
  *) export GLIBC_TUNABLES="$GLIBC_TUNABLES:glibc.malloc.tcache_count=4" ;;
esac
for config in "$@"; do
  out=$(mktemp -d)
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/cg.out" \
    "$remora" proxy --config "$root/benches/peers/$config.yaml" >"$out/log" 2>&1 & P=$!
  if [ "$config" = h2 ]; then
    wait_port 18093; sleep 1
    requests=$(taskset -c 0 h2load -c8 -m1 -D15 http://127.0.0.1:18093/ | awk '/^requests:/{print $8}')
  else
    wait_port 18083; sleep 1
    requests=$(taskset -c 0 wrk -t1 -c8 -d15s http://127.0.0.1:18083/ | awk '/requests in/{print $1}')
  fi
  kill -INT $P; wait $P 2>/dev/null
  for f in "$out"/cg.out-*; do
    thread=$(awk '/^thread:/ {print $2; exit}' "$f")
    ir=$(awk '/^summary:/ {print $2}' "$f")
    printf '%-14s thread %-3s %8.0f instructions/request\n' "$config" "${thread:-?}" "$(echo "$ir / $requests" | bc -l)"
  done
  echo "$config: $requests requests"
  rm -rf "$out"
done
