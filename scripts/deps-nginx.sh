#!/usr/bin/env bash
# Installs Debian's nginx for tests/nginx.rs, which runs deploy/nginx.conf in front of a broker.
# Idempotent: does nothing when /usr/sbin/nginx is there. Non-interactive; run as root (or with
# sudo available) on Debian/Ubuntu. The package's own service is not needed: the test starts
# nginx itself with its own prefix, pid and log files.
set -euo pipefail

if [[ -x /usr/sbin/nginx ]]; then
  echo "deps-nginx: nginx present: $(/usr/sbin/nginx -v 2>&1)" >&2
  exit 0
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "deps-nginx: need root (or sudo) to apt-get install nginx" >&2; exit 1; }
  sudo=(sudo)
fi
echo "deps-nginx: installing Debian nginx (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends nginx
[[ -x /usr/sbin/nginx ]] || { echo "deps-nginx: apt-get finished but /usr/sbin/nginx is missing" >&2; exit 1; }
