#!/usr/bin/env bash
# Soak: builds the release broker and examples/soak.rs, starts a broker on a free loopback port,
# runs the soak against it (SOAK_SUBSCRIBERS concurrent subscribers, a steady publish stream for
# SOAK_SECONDS, exact delivery accounting, broker RSS sampled every second), stops the broker.
#
# Exit status: 0 when every subscriber got exactly its messages, in order, and the broker's RSS
# stayed flat; 1 otherwise. "Flat": RSS at the end of publishing is within
# SOAK_MAX_RSS_GROWTH_PERCENT (default 10 %) of the RSS after the warm-up (30 s of publishing, or
# half of a shorter run). Why 30 s: the broker runs with --retain-age 30s, so by then retention
# is full and subscriber state allocated, and its legitimate memory stops growing. Why 10 %: what
# remains is allocator noise, 0.2-3 % in the 10 000-subscriber runs of docs/soak.md, while a leak
# of a few bytes per delivery (~32 500 deliveries/s) or ~1 KiB per message would pass 10 % of a
# ~160 MiB broker within minutes.
#
# Environment:
#   SOAK_SECONDS (60), SOAK_SUBSCRIBERS (10000), SOAK_MAX_RSS_GROWTH_PERCENT (10), and every
#   other SOAK_* option of `cargo run --example soak -- --help` (SOAK_RATE, SOAK_SSE_PERCENT,
#   SOAK_STREAMS_PER_CONNECTION, SOAK_PAYLOAD_BYTES, SOAK_WARMUP_SECONDS, SOAK_PRECREATE_TOPICS).
#   SOAK_OUT: directory for the broker log and the JSON summary (default: target/soak).
#   CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_SECONDS="${SOAK_SECONDS:-60}"
export SOAK_SUBSCRIBERS="${SOAK_SUBSCRIBERS:-10000}"
export SOAK_MAX_RSS_GROWTH_PERCENT="${SOAK_MAX_RSS_GROWTH_PERCENT:-10}"
target="${CARGO_TARGET_DIR:-target}"
out="${SOAK_OUT:-$target/soak}"
mkdir -p "$out"

echo "== cargo build --release (broker and soak)"
cargo build --release --locked --bin topichub --example soak

# Each SSE subscriber is one socket on each side; the gRPC ones share a few connections.
want=200000
if [ "$(id -u)" = 0 ]; then
    ulimit -Hn "$want" 2>/dev/null || true
fi
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then
    ulimit -Sn "$want"
else
    ulimit -Sn "$hard"
fi
needed=$(( SOAK_SUBSCRIBERS * ${SOAK_SSE_PERCENT:-20} / 100 + SOAK_SUBSCRIBERS / ${SOAK_STREAMS_PER_CONNECTION:-160} + 256 ))
echo "== open files: $(ulimit -Sn) (this soak needs about $needed per process)"
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$needed" ]; then
    echo "soak: the open-file limit $(ulimit -Sn) is too low for $SOAK_SUBSCRIBERS subscribers" >&2
    exit 1
fi

# The broker picks a free port itself (--listen 127.0.0.1:0) and logs it. Retention by age is
# short (30 s) so that retention is full, and memory flat, early in the run; every subscriber
# keeps up within milliseconds, so nothing it needs ever leaves retention.
log="$out/broker.log"
NO_COLOR=1 RUST_LOG=info "$target/release/topichub" serve --listen 127.0.0.1:0 --retain-age 30s \
    >"$log" 2>&1 &
broker=$!
stop_broker() {
    if kill -0 "$broker" 2>/dev/null; then
        kill -TERM "$broker" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$broker" 2>/dev/null || return 0
            sleep 0.1
        done
        kill -KILL "$broker" 2>/dev/null || true
    fi
}
trap stop_broker EXIT

addr=""
for _ in $(seq 300); do
    addr="$(sed -e 's/\x1b\[[0-9;]*m//g' "$log" | sed -n 's/.*listening.* addr=\([0-9.]*:[0-9]*\).*/\1/p' | head -n1)"
    [ -n "$addr" ] && break
    kill -0 "$broker" 2>/dev/null || { cat "$log" >&2; echo "soak: the broker exited" >&2; exit 1; }
    sleep 0.1
done
if [ -z "$addr" ]; then
    cat "$log" >&2
    echo "soak: the broker did not report its address within 30 s" >&2
    exit 1
fi
echo "== broker pid $broker on $addr; soak: $SOAK_SUBSCRIBERS subscribers, $SOAK_SECONDS s"

status=0
"$target/release/examples/soak" --url "http://$addr" --broker-pid "$broker" \
    --summary "$out/summary.json" || status=$?

stop_broker
trap - EXIT
echo "== summary: $out/summary.json, broker log: $log"
exit "$status"
