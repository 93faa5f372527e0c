#!/usr/bin/env bash
# Runs every test: installs what the tests need (idempotent: Debian chromium, npm packages of
# web/, a Python venv, Debian nginx and nats-server), then `cargo test`, which starts real brokers
# on 127.0.0.1:0 (and NATS JetStream clusters for cluster mode) and drives them with gRPC,
# gRPC-Web, HTTP, SSE, the CLI, a headless browser, buf curl and Python clients.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps-node.sh
scripts/deps-python.sh
scripts/deps-nginx.sh
scripts/deps-nats.sh
cargo test --locked --workspace "$@"
