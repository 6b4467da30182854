#!/usr/bin/env bash
# What the traffic policies cost on the HTTP/1.1 peer scenario: benches/peers/h1.yaml (no policy)
# against h1-policy.yaml (every policy on), through config-cost.sh (see it for how and the env).
#
# Usage: benches/policy-cost.sh        Env: DUR (default 10), RUNS, PEERS_DIR, REMORA
exec "$(dirname "$0")/config-cost.sh" h1 h1-policy
