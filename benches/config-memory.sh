#!/usr/bin/env bash
# What config costs in memory, and whether it comes back: a proxy (one worker) starts on a small
# config (a listener, a route table, a cluster, its endpoints), its file is rewritten to CLUSTERS
# clusters of ENDPOINTS endpoints each with a route per cluster, then back to the small config.
# Prints RSS at each step, RSS per cluster (with its endpoints, stats and route) 2 s and 7 s after
# the big config applied (settled: the allocator gives back every 5 s, memory::give_back), the
# peak while it was read and applied, and where RSS settled 7 s and 15 s after the config shrank.
#
# Clusters balance round robin, which keeps no run-time state per endpoint; BALANCER=ewma (the
# automatic mesh's) or least_request measures clusters that keep one.
#
# The issue's large case, 1.1 million endpoints: CLUSTERS=1000 ENDPOINTS=1100.
#
# Usage: benches/config-memory.sh     Env: CLUSTERS=2000 ENDPOINTS=5 BALANCER=round_robin, REMORA=binary
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
remora=${REMORA:-$root/target/release/remora}
CLUSTERS=${CLUSTERS:-2000}; ENDPOINTS=${ENDPOINTS:-5}; BALANCER=${BALANCER:-round_robin}
[ -x "$remora" ] || (cd "$root" && cargo build --release --bin remora)
dir=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
config() { # $1 clusters, $2 endpoints each
  python3 - "$1" "$2" "$BALANCER" <<'PY'
import sys
clusters, endpoints, balancer = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def address(i):  # a distinct address for each of up to 16 million endpoints, 10.0.0.1 on
    i += 1
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:8080"
print("bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\nresources:")
print("  - {kind: Listener, name: in, address: \"127.0.0.1:0\", protocol: http1, route_tables: [t]}")
print("  - kind: RouteTable\n    name: t\n    routes:")
for c in range(clusters):
    print(f"      - {{match: {{path: {{prefix: /c{c}/}}}}, backends: [{{cluster: c{c}}}]}}")
for c in range(clusters):
    print(f"  - {{kind: Cluster, name: c{c}, protocol: http1, balancer: {balancer}}}")
    eps = ", ".join(f"{{address: \"{address(c * endpoints + e)}\"}}" for e in range(endpoints))
    print(f"  - {{kind: Endpoints, cluster: c{c}, endpoints: [{eps}]}}")
PY
}
config 1 1 > "$dir/small.yaml"; config "$CLUSTERS" "$ENDPOINTS" > "$dir/big.yaml"
cp "$dir/small.yaml" "$dir/config.yaml"
"$remora" proxy --config "$dir/config.yaml" >"$dir/log" 2>&1 & P=$!
rss() { awk '/VmRSS/{print $2}' /proc/$P/status; }
applied() { grep -c "config applied" "$dir/log" || true; }
for _ in $(seq 100); do [ "$(applied)" -ge 1 ] && break; sleep 0.1; done
sleep 2; small=$(rss)
n=$(applied); cp "$dir/big.yaml" "$dir/config.yaml.new" && mv "$dir/config.yaml.new" "$dir/config.yaml"
peak=0  # while the big config is read and applied
for _ in $(seq 1200); do r=$(rss); [ "$r" -gt "$peak" ] && peak=$r; [ "$(applied)" -gt "$n" ] && break; sleep 0.05; done
sleep 2; early=$(rss); sleep 5; big=$(rss)
n=$(applied); cp "$dir/small.yaml" "$dir/config.yaml.new" && mv "$dir/config.yaml.new" "$dir/config.yaml"
for _ in $(seq 600); do [ "$(applied)" -gt "$n" ] && break; sleep 0.1; done
sleep 7; back=$(rss); sleep 8; later=$(rss)
echo "small config: ${small} KiB; ${CLUSTERS} clusters × ${ENDPOINTS} endpoints (${BALANCER}): peak ${peak} KiB, ${early} KiB 2 s after, ${big} KiB 7 s after; small again: ${back} KiB 7 s later, ${later} KiB 15 s later"
awk -v s="$small" -v b="$big" -v y="$early" -v k="$back" -v l="$later" -v c="$CLUSTERS" -v e="$ENDPOINTS" 'BEGIN {
  printf "per cluster (with %d endpoints, its stats and a route), settled: %.2f kB; per endpoint: %.0f bytes\n", e, (b - s) * 1.024 / c, (b - s) * 1024 / (c * e)
  printf "2 s after it applied (before the give-back may have run): %.2f kB per cluster\n", (y - s) * 1.024 / c
  printf "after shrinking: %+.1f%% (7 s), %+.1f%% (15 s) against the small config at start\n", (k - s) * 100 / s, (l - s) * 100 / s }'
