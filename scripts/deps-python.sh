#!/usr/bin/env bash
# Installs the Python tools the tests run into $REPO/.venv: the seed gRPC client of
# `cargo test --test seed_python` (tests/python/requirements.txt) and the API conformance fuzzer
# of `cargo test --test schemathesis` (tests/python/requirements-api.txt).
#
# Idempotent and non-interactive: creates the venv if missing, installs the exact pins of both
# requirement files, and records them in a stamp file; a re-run with unchanged requirements (and
# a working venv) returns at once. Needs python3 3.11+ (schemathesis's minimum) with venv, and
# access to PyPI (or a mirror configured for pip, e.g. PIP_INDEX_URL).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
requirements=("$repo/tests/python/requirements.txt" "$repo/tests/python/requirements-api.txt")
stamp="$venv/.topichub-requirements.txt"
python="${PYTHON:-python3}"

# The stamp is both files concatenated, so a change to either reinstalls.
if [[ -x "$venv/bin/python" && -x "$venv/bin/schemathesis" && -f "$stamp" ]] \
    && cat "${requirements[@]}" | cmp -s - "$stamp" \
    && "$venv/bin/python" -c 'import grpc, grpc_tools.protoc, grpc_reflection, schemathesis' 2>/dev/null; then
    echo "deps-python: $venv is up to date"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "deps-python: creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

echo "deps-python: installing ${requirements[*]}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Binary wheels only: building grpcio from source takes many minutes and a C++ toolchain.
"$venv/bin/python" -m pip install --quiet --only-binary=:all: "${requirements[@]/#/--requirement=}"
cat "${requirements[@]}" >"$stamp"
echo "deps-python: done ($("$venv/bin/python" -m pip freeze | tr '\n' ' '))"
