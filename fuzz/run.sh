#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS_PER_TARGET seconds (default 30) from its committed seeds, failing
# on the first crash (libFuzzer writes the input to fuzz/artifacts/TARGET/). TARGETS narrows the set.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). See README.md.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${SECONDS_PER_TARGET:-30}
targets=${TARGETS:-$(cargo +nightly fuzz list)}
cargo +nightly fuzz build --sanitizer none
for target in $targets; do
  mkdir -p "work/$target"
  echo "fuzz: $target for ${seconds}s"
  status=0
  cargo +nightly fuzz run --sanitizer none "$target" "work/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"work/$target.log" 2>&1 || status=$?
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "work/$target.log" || true
  if [ "$status" -ne 0 ]; then
    grep -v '^ *[0-9]*: \|^ *at ' "work/$target.log" | tail -40
    echo "fuzz: $target failed; the input is in fuzz/artifacts/$target/"
    exit 1
  fi
done
