#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECONDS seconds each (default 20), one after
# the other, and fails if any of them finds a crash (a panic, a sanitizer report, a timeout or
# running out of memory). Prints each target's number of executions. See fuzz/README.md.
#
#   scripts/fuzz.sh                   # every target, 20 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh cursor topic_pattern
#
# Environment:
#   FUZZ_SECONDS    seconds per target (libFuzzer -max_total_time), default 20
#   FUZZ_SANITIZER  cargo fuzz --sanitizer: address (default), leak, memory, thread or none
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a crash, default 10
#
# Installs cargo-fuzz (pinned) when missing. The only toolchain is stable Rust: cargo-fuzz
# needs nightly flags (-Zsanitizer, -Cpasses=sancov-module), which stable accepts with
# RUSTC_BOOTSTRAP=1, set here for the fuzz build only.
#
# The committed seeds in fuzz/corpus/<target>/ are only read; what libFuzzer adds goes to
# fuzz/work/<target>/ (not committed), crashes to fuzz/artifacts/<target>/, logs to fuzz/work/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
timeout="${FUZZ_TIMEOUT:-10}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(topic_pattern cursor publish_json proto_requests publish_request subscribe_request http2_frames)
fi

cd fuzz
# Build against the dependency versions the broker itself is locked to: start from its lock
# file (cargo then adds the fuzzing crates). fuzz/Cargo.lock is therefore not committed.
cp ../Cargo.lock Cargo.lock

echo "== cargo fuzz build (sanitizer: $sanitizer)"
build_start=$SECONDS
cargo fuzz build --sanitizer "$sanitizer"
echo "   built in $((SECONDS - build_start)) s"

mkdir -p work/logs
failed=()
summary=()
for target in "${targets[@]}"; do
    echo "== $target: ${seconds} s"
    mkdir -p "work/$target"
    log="work/logs/$target.log"
    status=ok
    # New inputs go to the first corpus directory (work/), seeds are read from the second.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1 >"$log" 2>&1; then
        status=FAILED
        failed+=("$target")
        echo "---- $log (end)"
        tail -n 60 "$log"
        echo "----"
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    corpus=$(find "work/$target" -type f | wc -l)
    line="$target: ${runs:-?} executions (${rate:-?}/s), corpus $corpus inputs: $status"
    echo "   $line"
    summary+=("$line")
done

echo "== summary (${seconds} s per target)"
printf '   %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "== crashes in: ${failed[*]}; inputs in fuzz/artifacts/<target>/, see fuzz/README.md"
    exit 1
fi
