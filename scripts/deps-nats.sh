#!/usr/bin/env bash
# Installs Debian's nats-server for tests/cluster.rs, which starts real JetStream clusters
# (`nats-server -js`) under topichub's cluster mode. Idempotent: does nothing when
# /usr/sbin/nats-server is there. Non-interactive; run as root (or with sudo available) on
# Debian/Ubuntu. The package's own service is not needed: the tests start their own servers.
set -euo pipefail

if [[ -x /usr/sbin/nats-server ]]; then
  echo "deps-nats: nats-server present: $(/usr/sbin/nats-server --version 2>&1)" >&2
  exit 0
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "deps-nats: need root (or sudo) to apt-get install nats-server" >&2; exit 1; }
  sudo=(sudo)
fi
echo "deps-nats: installing Debian nats-server (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends nats-server
[[ -x /usr/sbin/nats-server ]] || { echo "deps-nats: apt-get finished but /usr/sbin/nats-server is missing" >&2; exit 1; }
