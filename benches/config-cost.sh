#!/usr/bin/env bash
# What a config costs on the HTTP/1.1 peer scenario, against the first one named: Remora with each
# config (files in benches/peers/), alternated RUNS times (default 3), each pinned alone on CPU 1
# against the peer kit's nginx backend, wrk on CPU 0 (the kit's run_wrk); spans, if a config traces,
# go to the OTLP sink on CPU 0 (see kit.sh). Prints each run (with the spans it exported, dropped
# and failed), then each config's mean CPU microseconds per request against the first's, and each
# config's median p99. policy-cost.sh and trace-cost.sh run it with their configs.
#
# Usage: benches/config-cost.sh BASE CONFIG...   Env: DUR (default 10), RUNS, PEERS_DIR, REMORA
set -u
[ $# -ge 2 ] || { echo "usage: $0 BASE CONFIG..." >&2; exit 2; }
. "$(dirname "$0")/kit.sh"
results=$(mktemp)
for _ in $(seq "${RUNS:-3}"); do
  for config in "$@"; do
    taskset -c 1 "$remora" proxy --config "$root/benches/peers/$config.yaml" >/tmp/bench-cost.log 2>&1 & P=$!
    wait_port 18083
    line=$(run_wrk "$config" 18083 $P); echo "$line"; echo "$line" >>"$results"
    admin=$(sed -n 's/.*admin=\([0-9.:]*\).*/\1/p' /tmp/bench-cost.log | head -1)
    sleep 1.5
    spans=$(curl -s "http://$admin/metrics" | awk '/^remora_trace_spans_total/ {printf "%s ", $0}')
    [ -n "$spans" ] && echo "  $spans"
    kill $P; wait $P 2>/dev/null
  done
done
awk -v base="$1" '{for (i = 2; i <= NF; i++) if ($i ~ /^cpu_us\/req=/) { split($i, v, "="); sum[$1] += v[2]; n[$1]++ } }
     END { off = sum[base] / n[base];
           for (c in sum) if (c != base) printf "mean cpu_us/req: %-14s %.2f (%+.1f%% against %s, %.2f)\n", c, sum[c] / n[c], (sum[c] / n[c] / off - 1) * 100, base, off }' "$results"
for config in "$@"; do
  awk -v c="$config" '$1 == c { for (i = 2; i <= NF; i++) if ($i ~ /^p99=/) { v = substr($i, 5); if (v ~ /ms$/) v = substr(v, 1, length(v) - 2) * 1000; else if (v ~ /us$/) v = substr(v, 1, length(v) - 2) + 0; else v = v * 1e6; print v } }' "$results" |
    sort -n | awk -v c="$config" '{ a[NR] = $1 } END { printf "median p99 %-14s %.0f us\n", c, a[int((NR + 1) / 2)] }'
done
rm -f "$results"
