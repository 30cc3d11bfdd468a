#!/bin/sh
# Runs every fuzz target for a short while on its corpus (for CI): ~20 s each by default.
# Usage: fuzz/run-short.sh [seconds]. Needs a nightly toolchain and cargo-fuzz
# (cargo install cargo-fuzz). Fails on the first target that finds a crash, leak or timeout.
set -eu
cd "$(dirname "$0")"
secs="${1:-20}"
# New inputs go to a scratch directory: the corpora in the repo stay as they are.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target" "$scratch/$target"
    echo "== $target (${secs}s)"
    cargo +nightly fuzz run -O "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1
done
