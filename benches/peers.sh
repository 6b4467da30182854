#!/usr/bin/env bash
# Runs the peer benchmarks (nginx and HAProxy on this machine) with Remora beside them, using the
# configs in benches/peers/. Each proxy runs alone on CPU 1 with one worker; see the peer scripts'
# README for what they measure and what they need installed.
#
# Usage: benches/peers.sh [h1] [h2] [tcp] [latency]     (default: h1 h2 tcp)
# Env:   DUR=seconds per run (default 10), PEERS_DIR=the peer scripts (default ../shared/bench),
#        REMORA=the binary to measure (default target/release/remora, built if missing).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS_DIR:-$root/../shared/bench}
remora=${REMORA:-$root/target/release/remora}
[ -d "$peers" ] || { echo "peer scripts not found at $peers (set PEERS_DIR)" >&2; exit 2; }
[ -x "$remora" ] || (cd "$root" && cargo build --release --bin remora)
[ $# -gt 0 ] || set -- h1 h2 tcp
for which in "$@"; do
  echo "== $which"
  case $which in
    h1) PROJECT_CMD="$remora proxy --config $root/benches/peers/h1.yaml" PROJECT_PORT=18083 "$peers/peers.sh" ;;
    h2) PROJECT_CMD="$remora proxy --config $root/benches/peers/h2.yaml" PROJECT_PORT=18093 "$peers/peers-h2.sh" ;;
    tcp) PROJECT_CMD="$remora proxy --config $root/benches/peers/tcp.yaml" PROJECT_PORT=18103 "$peers/peers-tcp.sh" ;;
    latency) PROJECT_CMD="$remora proxy --config $root/benches/peers/h1.yaml" PROJECT_PORT=18083 "$peers/peers-latency.sh" ;;
    *) echo "unknown benchmark $which (h1, h2, tcp, latency)" >&2; exit 2 ;;
  esac
done
