# Sourced by the cost runners (config-cost.sh, callgrind-cost.sh, idle-tcp.sh): finds the peer
# kit and the Remora binary (building it if missing), loads the kit's helpers (start_backend,
# run_wrk, wait_port), stops every background job on exit, and starts the kit's nginx backend
# and the OTLP sink of peers/otlp-sink-nginx.conf, both on CPU 0.
# Env: PEERS_DIR (default ../shared/bench), REMORA (default target/release/remora).
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
