#!/usr/bin/env bash
# How long the admin server takes to answer a liveness probe while the proxy compiles a large
# config: Remora starts on a one-route config, the file is replaced by one of ROUTES routes
# (default 100,000: about 6.7 MB of YAML), and /live is probed every 20 ms until the file watcher
# has applied it. Prints when it was applied and the probes' p50, p99 and slowest.
#
# Usage: benches/probes-during-reload.sh        Env: ROUTES, REMORA (default target/release/remora)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
remora=${REMORA:-$root/target/release/remora}
[ -x "$remora" ] || (cd "$root" && cargo build --release --bin remora)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
admin=$(port)
cd "$work"
python3 - "${ROUTES:-100000}" "$admin" "$(port)" <<'PY'
import sys
routes, admin, listen = int(sys.argv[1]), sys.argv[2], sys.argv[3]
head = f"""bootstrap: {{admin_address: "127.0.0.1:{admin}", workers: 1}}
resources:
  - {{kind: Cluster, name: a}}
  - {{kind: Endpoints, cluster: a, endpoints: [{{address: "127.0.0.1:9"}}]}}
  - {{kind: Listener, name: in, address: "127.0.0.1:{listen}", route_tables: [main]}}
"""
open("small.yaml", "w").write(head + "  - {kind: RouteTable, name: main, routes: [{backends: [{cluster: a}]}]}\n")
many = ",\n".join(f"    {{match: {{path: {{prefix: /r{i}/}}}}, backends: [{{cluster: a}}]}}" for i in range(routes))
open("big.yaml", "w").write(head + "  - kind: RouteTable\n    name: main\n    routes: [\n" + many + ",\n    {backends: [{cluster: a}]}]\n")
PY
cp small.yaml live.yaml
"$remora" proxy --config live.yaml >proxy.log 2>&1 &
python3 - "$admin" <<'PY'
import os, shutil, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def get(path, timeout=10):
    return urllib.request.urlopen(base + path, timeout=timeout).read().decode()
for _ in range(100):
    try:
        get("/live"); break
    except OSError:
        time.sleep(0.1)
def applied():
    return [l for l in get("/metrics").splitlines() if l.startswith('remora_config_reloads_total{result="applied"}')]
before = applied()
shutil.copy("big.yaml", "live.tmp"); os.replace("live.tmp", "live.yaml")
start, probes, done = time.monotonic(), [], None
while time.monotonic() - start < 120:
    t = time.monotonic(); get("/live", timeout=5); probes.append(time.monotonic() - t)
    if len(probes) % 5 == 0 and applied() != before:
        done = time.monotonic() - start; break
    time.sleep(0.02)
probes.sort()
ms = lambda q: probes[min(len(probes) - 1, int(len(probes) * q))] * 1000
print(f"reload applied within {done:.2f} s; {len(probes)} probes meanwhile: p50 {ms(0.5):.2f} ms, p99 {ms(0.99):.2f} ms, slowest {probes[-1]*1000:.2f} ms")
PY
