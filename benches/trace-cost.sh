#!/usr/bin/env bash
# What tracing costs on the HTTP/1.1 peer scenario, through config-cost.sh (see it for how and the
# env): benches/peers/h1.yaml (tracing off) against h1-trace-1pct.yaml (1% of new traces sampled),
# h1-trace-1pct-quiet.yaml (the same, with no traceparent on the unsampled ones),
# h1-trace-all.yaml (every request traced) and h1-trace-dead.yaml (every request traced, the
# collector down); spans go over OTLP/HTTP to the nginx sink of peers/otlp-sink-nginx.conf.
#
# Usage: benches/trace-cost.sh        Env: DUR (default 10), RUNS, PEERS_DIR, REMORA
exec "$(dirname "$0")/config-cost.sh" h1 h1-trace-1pct h1-trace-1pct-quiet h1-trace-all h1-trace-dead
