#!/usr/bin/env bash
# What the traffic policies cost on the HTTP/1.1 peer scenario: Remora with benches/peers/h1.yaml
# (no policy) and benches/peers/h1-policy.yaml (every policy on), alternated RUNS times (default 3),
# each pinned alone on CPU 1 against the peer kit's nginx backend, wrk on CPU 0 (the kit's
# run_wrk). Prints each run and the mean CPU microseconds per request of each config.
#
# Usage: benches/policy-cost.sh        Env: DUR (default 10), RUNS, PEERS_DIR, REMORA (as peers.sh)
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${PEERS_DIR:-$root/../shared/bench}
remora=${REMORA:-$root/target/release/remora}
[ -f "$BENCH_DIR/lib.sh" ] || { echo "peer kit not found at $BENCH_DIR (set PEERS_DIR)" >&2; exit 2; }
[ -x "$remora" ] || (cd "$root" && cargo build --release --bin remora)
. "$BENCH_DIR/lib.sh"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
start_backend
results=$(mktemp)
for _ in $(seq "${RUNS:-3}"); do
  for config in h1 h1-policy; do
    taskset -c 1 "$remora" proxy --config "$root/benches/peers/$config.yaml" >/tmp/bench-policy.log 2>&1 & P=$!
    wait_port 18083
    line=$(run_wrk "$config" 18083 $P); echo "$line"; echo "$line" >>"$results"
    kill $P; wait $P 2>/dev/null
  done
done
awk '{for (i = 2; i <= NF; i++) if ($i ~ /^cpu_us\/req=/) { split($i, v, "="); sum[$1] += v[2]; n[$1]++ } }
     END { off = sum["h1"] / n["h1"]; on = sum["h1-policy"] / n["h1-policy"];
           printf "mean cpu_us/req: policies off %.2f, on %.2f (%+.1f%%)\n", off, on, (on / off - 1) * 100 }' "$results"
rm -f "$results"
