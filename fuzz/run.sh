#!/usr/bin/env bash
# `make fuzz`: runs every fuzz target for FUZZ_SECONDS (default 60) with
# cargo-fuzz (libFuzzer) on a nightly toolchain. Without a nightly toolchain
# it says so and skips (exit 0); it fails only when a target finds a crash,
# a hang or an out-of-memory. New inputs go to fuzz/corpus-grown/<target>
# (not committed); the committed seeds in fuzz/corpus/<target> are read only.
set -u
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGETS:-rules path_host http_head client_hello first_line admission csr}"

if ! command -v rustup >/dev/null 2>&1 || ! rustup toolchain list | grep -q '^nightly'; then
    echo "make fuzz: no nightly toolchain (rustup toolchain install nightly); skipping"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "make fuzz: cargo-fuzz is missing; installing it (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked || {
        echo "make fuzz: could not install cargo-fuzz"
        exit 1
    }
fi

# The fuzz build (sanitizers, coverage) lives in fuzz/target, never in the
# main build's target directory.
unset CARGO_TARGET_DIR
failed=""
for t in $targets; do
    echo "make fuzz: $t for ${seconds}s"
    mkdir -p "fuzz/corpus-grown/$t"
    if ! cargo +nightly fuzz run "$t" "fuzz/corpus-grown/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1; then
        echo "make fuzz: $t FAILED (the input is in fuzz/artifacts/$t/)"
        failed="$failed $t"
    fi
done
if [ -n "$failed" ]; then
    echo "make fuzz: failing targets:$failed"
    exit 1
fi
echo "make fuzz: every target ran ${seconds}s without a finding"
