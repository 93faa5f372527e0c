#!/usr/bin/env bash
# Benchmarks topichub against nats-server, nginx + nchan and mosquitto on loopback.
#
#   bench/run.sh                 the full suite: every scenario, every target, 3 runs each
#                                (about 22 minutes on 2 cores with the storm, wildcards, topics,
#                                durable, restart and cluster scenarios); results in target/bench/
#   bench/run.sh --smoke         the CI smoke run: topichub and nats-server only, 1 short run
#                                each, fewer subscribers; fails unless every figure is sane
#   bench/run.sh [OPTIONS]       any option of `topichub-bench suite --help`, e.g.
#                                --scenarios fanout,rate --targets sse,nchan --runs 5
#
# What it does: installs the peers and load tools it lacks (Debian packages: nats-server, nginx,
# libnginx-mod-nchan, mosquitto, nghttp2-client for h2load, wrk), builds the release broker and
# the harness, raises the open-file limit to its hard maximum, and runs the harness pinned to
# CPU 1; the harness pins every server it starts to CPU 0 and restarts it for every run.
# CARGO_TARGET_DIR is honoured. See bench/README.md for the scenarios and figures.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'bench: %s\n' "$*" >&2; }

smoke=false
args=()
for arg in "$@"; do
    if [[ "$arg" == --smoke ]]; then smoke=true; else args+=("$arg"); fi
done

# --- peers and tools (Debian packages) -------------------------------------------------------
packages=()
command -v nats-server >/dev/null || packages+=(nats-server)
command -v h2load >/dev/null || packages+=(nghttp2-client)
command -v wrk >/dev/null || packages+=(wrk)
command -v taskset >/dev/null || packages+=(util-linux)
if ! $smoke; then
    command -v nginx >/dev/null || packages+=(nginx)
    [[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]] || packages+=(libnginx-mod-nchan)
    command -v mosquitto >/dev/null || packages+=(mosquitto)
fi
if ((${#packages[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { log "need root (or sudo) to apt-get install ${packages[*]}"; exit 1; }
        sudo=(sudo)
    fi
    log "installing ${packages[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    # policy-rc.d 101: the packages' own services (nginx on :80, mosquitto on :1883) are not
    # started; the harness starts its own instances on free loopback ports.
    policy=/usr/sbin/policy-rc.d
    created_policy=false
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod +x "$policy"
        created_policy=true
    fi
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"
    if $created_policy; then "${sudo[@]}" rm -f "$policy"; fi
fi

# --- build -----------------------------------------------------------------------------------
log "cargo build --release (broker and harness)"
cargo build --release --locked -p topichub -p topichub-bench --bins
target="${CARGO_TARGET_DIR:-target}"

# Every idle subscriber is one socket in the broker and one in the harness.
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
log "open-file limit: $(ulimit -Sn)"

if [[ $(nproc) -ge 2 ]]; then
    pin=(taskset -c 1)
    server_cpus=0
else
    log "one CPU: server and client are not pinned apart"
    pin=()
    server_cpus=none
fi

if $smoke; then
    # The scale scenarios at a hundredth of their size or less (about 15 s together); the
    # cluster scenario with 20 subscribers (two 3-node NATS clusters, about 20 s).
    args=(--runs 1 --seconds 1 --warmup 0.3 --subscribers 100 --idle-subscribers 300
          --max-idle 2000 --streams-per-connection 50
          --storm-streams 1000,2000 --storm-connections 10 --probe-rate 200
          --wildcard-subscriptions 0,100,1000 --wildcard-topics 2000
          --topic-counts 0,2000,20000 --topics-retain-age 6
          --cluster-subscribers 20
          --targets grpc,grpc-mux,grpc-cluster,seed,sse,sse-h2,nats,raw,tonic-floor,h2-floor
          --out "$target/bench-smoke" --check "${args[@]}")
elif [[ " ${args[*]} " != *" --out "* && " ${args[*]} " != *" --out="* ]]; then
    args=(--out "$target/bench" "${args[@]}")
fi
exec "${pin[@]}" "$target/release/topichub-bench" suite --topichub "$target/release/topichub" \
    --server-cpus "$server_cpus" --work "$target/bench/work" "${args[@]}"
