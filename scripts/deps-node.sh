#!/usr/bin/env bash
# Installs what the browser tests and `buf curl` tests need, and nothing else:
#   - Debian's `chromium` package (/usr/bin/chromium), driven by playwright-core; Playwright's own
#     browser downloads are never used;
#   - the npm devDependencies of web/ (playwright-core, buf, protoc-gen-es, connect, esbuild),
#     exactly as pinned by web/package-lock.json (`npm ci --ignore-scripts`: no dependency runs
#     install scripts; buf and esbuild work without theirs, through their platform packages).
# Idempotent: each step is skipped when already done. Non-interactive; run as root (or with sudo
# available) on Debian/Ubuntu. Needs node >= 18 and npm on PATH.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
web="$root/web"

log() { printf 'deps-node: %s\n' "$*" >&2; }

# --- chromium -------------------------------------------------------------------------------
if [[ -x /usr/bin/chromium ]]; then
  log "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
else
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { log "need root (or sudo) to apt-get install chromium"; exit 1; }
    sudo=(sudo)
  fi
  log "installing Debian chromium (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium fonts-liberation
  [[ -x /usr/bin/chromium ]] || { log "apt-get finished but /usr/bin/chromium is missing"; exit 1; }
fi

# --- npm devDependencies ---------------------------------------------------------------------
command -v npm >/dev/null || { log "npm not found: install Node.js 20 (e.g. apt-get install -y nodejs npm)"; exit 1; }
stamp="$web/node_modules/.package-lock.json" # written by npm on every install
if [[ -d "$web/node_modules" && -f "$stamp" && ! "$web/package-lock.json" -nt "$stamp" ]]; then
  log "web/node_modules up to date"
else
  log "npm ci in web/"
  (cd "$web" && npm ci --no-audit --no-fund --ignore-scripts)
fi

# Sanity: the tools the tests call.
"$web/node_modules/.bin/buf" --version >/dev/null
node -e "require.resolve('playwright-core', { paths: ['$web'] })"
log "ok"
