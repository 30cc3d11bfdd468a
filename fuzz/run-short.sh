#!/bin/sh
# Runs every fuzz target of every fuzz crate (fuzz/, api/fuzz, devices/fuzz-9p) for a short
# while on its corpus (for CI): ~20 s each by default.
# Usage: fuzz/run-short.sh [seconds]. Needs a nightly toolchain and cargo-fuzz
# (cargo install cargo-fuzz). Fails on the first target that finds a crash, leak or timeout.
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-20}"
# New inputs go to a scratch directory: the corpora in the repo stay as they are.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for crate in fuzz api/fuzz devices/fuzz-9p; do
    [ -f "$root/$crate/Cargo.toml" ] || continue
    cd "$root/$crate"
    for target in $(cargo +nightly fuzz list --fuzz-dir "$root/$crate"); do
        mkdir -p "$root/$crate/corpus/$target" "$scratch/$target"
        echo "== $crate: $target (${secs}s)"
        # One target directory for all three crates: their common dependencies build once.
        cargo +nightly fuzz run --fuzz-dir "$root/$crate" --target-dir "$root/target/fuzz" -O "$target" \
            "$scratch/$target" "$root/$crate/corpus/$target" -- \
            -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1
    done
done
