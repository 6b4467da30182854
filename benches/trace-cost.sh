#!/usr/bin/env bash
# What tracing costs on the HTTP/1.1 peer scenario: Remora with benches/peers/h1.yaml (tracing
# off), h1-trace-1pct.yaml (1% of new traces sampled), h1-trace-1pct-quiet.yaml (the same, with no
# traceparent on the unsampled ones), h1-trace-all.yaml (every request traced) and
# h1-trace-dead.yaml (every request traced, the collector down), alternated RUNS times (default 3),
# each pinned alone on CPU 1 against the peer kit's nginx backend, wrk on CPU 0 (the kit's
# run_wrk). Spans go over OTLP/HTTP to an nginx sink on CPU 0 (benches/peers/otlp-sink-nginx.conf).
# Prints each run with the spans it exported, dropped and failed, then the mean CPU microseconds
# per request and the median p99 of each config.
#
# Usage: benches/trace-cost.sh        Env: DUR (default 10), RUNS, PEERS_DIR, REMORA (as peers.sh),
#                                     CONFIGS (default: all five, in the order above)
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${PEERS_DIR:-$root/../shared/bench}
remora=${REMORA:-$root/target/release/remora}
[ -f "$BENCH_DIR/lib.sh" ] || { echo "peer kit not found at $BENCH_DIR (set PEERS_DIR)" >&2; exit 2; }
[ -x "$remora" ] || (cd "$root" && cargo build --release --bin remora)
. "$BENCH_DIR/lib.sh"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
start_backend
taskset -c 0 nginx -c "$root/benches/peers/otlp-sink-nginx.conf" >/dev/null 2>&1 &
wait_port 18318
results=$(mktemp)
for _ in $(seq "${RUNS:-3}"); do
  for config in ${CONFIGS:-h1 h1-trace-1pct h1-trace-1pct-quiet h1-trace-all h1-trace-dead}; do
    taskset -c 1 "$remora" proxy --config "$root/benches/peers/$config.yaml" >/tmp/bench-trace.log 2>&1 & P=$!
    wait_port 18083
    line=$(run_wrk "$config" 18083 $P); echo "$line"; echo "$line" >>"$results"
    admin=$(sed -n 's/.*admin=\([0-9.:]*\).*/\1/p' /tmp/bench-trace.log | head -1)
    sleep 1.5
    spans=$(curl -s "http://$admin/metrics" | awk '/^remora_trace_spans_total/ {printf "%s ", $0}')
    [ -n "$spans" ] && echo "  $spans"
    kill $P; wait $P 2>/dev/null
  done
done
awk '{for (i = 2; i <= NF; i++) if ($i ~ /^cpu_us\/req=/) { split($i, v, "="); sum[$1] += v[2]; n[$1]++ } }
     END { off = sum["h1"] / n["h1"];
           for (c in sum) if (c != "h1") printf "mean cpu_us/req: %-14s %.2f (%+.1f%% against tracing off, %.2f)\n", c, sum[c] / n[c], (sum[c] / n[c] / off - 1) * 100, off }' "$results"
for config in ${CONFIGS:-h1 h1-trace-1pct h1-trace-1pct-quiet h1-trace-all h1-trace-dead}; do
  awk -v c="$config" '$1 == c { for (i = 2; i <= NF; i++) if ($i ~ /^p99=/) { v = substr($i, 5); if (v ~ /ms$/) v = substr(v, 1, length(v) - 2) * 1000; else if (v ~ /us$/) v = substr(v, 1, length(v) - 2) + 0; else v = v * 1e6; print v } }' "$results" |
    sort -n | awk -v c="$config" '{ a[NR] = $1 } END { printf "median p99 %-14s %.0f us\n", c, a[int((NR + 1) / 2)] }'
done
rm -f "$results"
