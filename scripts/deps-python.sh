#!/usr/bin/env bash
# Installs the Python client used by `cargo test --test seed_python` into $REPO/.venv.
#
# Idempotent and non-interactive: creates the venv if missing, installs the exact pins of
# tests/python/requirements.txt, and records them in a stamp file; a re-run with unchanged
# requirements (and a working venv) returns at once. Needs python3 (3.9+) with venv and access to
# PyPI (or a mirror configured for pip, e.g. PIP_INDEX_URL).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
requirements="$repo/tests/python/requirements.txt"
stamp="$venv/.topichub-requirements.txt"
python="${PYTHON:-python3}"

if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$requirements" "$stamp" \
    && "$venv/bin/python" -c 'import grpc, grpc_tools.protoc, grpc_reflection' 2>/dev/null; then
    echo "deps-python: $venv is up to date"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "deps-python: creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

echo "deps-python: installing $requirements"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Binary wheels only: building grpcio from source takes many minutes and a C++ toolchain.
"$venv/bin/python" -m pip install --quiet --only-binary=:all: -r "$requirements"
cp "$requirements" "$stamp"
echo "deps-python: done ($("$venv/bin/python" -m pip freeze | tr '\n' ' '))"
