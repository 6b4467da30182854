#!/usr/bin/env bash
# Does memory come back after bursts? Remora (one worker, benches/memory/proxy.yaml) in front of an
# nginx serving 1 MiB; each burst is CONNS connections at once (h2load --h1, one request each, so
# every connection moves a 1 MiB response), then the proxy's RSS is sampled each second for SETTLE
# seconds. Prints the RSS before the first burst, each burst's peak, and where RSS settled.
#
# Usage: benches/memory-return.sh     Env: BURSTS=3 CONNS=10000 SETTLE=30, REMORA=binary
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
remora=${REMORA:-$root/target/release/remora}
BURSTS=${BURSTS:-3}; CONNS=${CONNS:-10000}; SETTLE=${SETTLE:-30}
command -v h2load >/dev/null || { echo "needs h2load (apt-get install nghttp2-client)" >&2; exit 2; }
[ -x "$remora" ] || (cd "$root" && cargo build --release --bin remora)
# The proxy holds two descriptors per connection (downstream and upstream): 2 × CONNS and some.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
mkdir -p /tmp/bench-memory-www
head -c 1048576 /dev/zero > /tmp/bench-memory-www/big
taskset -c 0 nginx -c "$root/benches/memory/backend-1mib-nginx.conf" >/dev/null 2>&1 &
taskset -c 1 "$remora" proxy --config "$root/benches/memory/proxy.yaml" >/tmp/bench-memory-remora.log 2>&1 &
P=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18183) 2>/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/{print $2}' /proc/$P/status; }
h2load --h1 -n 100 -c 10 http://127.0.0.1:18183/big >/dev/null 2>&1   # warm-up
sleep 2
start=$(rss); echo "before the first burst: ${start} KiB"
for burst in $(seq "$BURSTS"); do
  peak=0
  taskset -c 0 h2load --h1 -n "$CONNS" -c "$CONNS" http://127.0.0.1:18183/big > /tmp/bench-memory-h2load.log 2>&1 &
  L=$!
  while kill -0 $L 2>/dev/null; do r=$(rss); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.2; done
  ok=$(awk '/status codes:/{print $3}' /tmp/bench-memory-h2load.log)
  settled=""; for s in $(seq "$SETTLE"); do sleep 1; [ $((s % 5)) -eq 0 ] && settled="$settled ${s}s=$(rss)"; done
  echo "burst $burst: ${ok:-?} responses 2xx, peak ${peak} KiB; after:${settled} KiB"
done
end=$(rss)
awk -v a="$start" -v b="$end" 'BEGIN{printf "settled at %d KiB against %d KiB before: %+.1f%%\n", b, a, (b-a)*100/a}'
