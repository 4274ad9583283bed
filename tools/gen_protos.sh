#!/usr/bin/env bash
# Generates the Python code of protos/ into the importable package usagebilling/.
# Usage: tools/gen_protos.sh [OUT_DIR]   (default: the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-$root/.venv/bin/python}
export PATH="$(dirname "$py"):$PATH"
cd "$root"
rm -rf "$out/usagebilling"
mkdir -p "$out"
mapfile -t files < <(find protos -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "${files[@]}"
# Make every generated folder a regular package.
find "$out/usagebilling" -type d -exec touch {}/__init__.py \;
# The OpenAPI document of the HTTP/JSON API, from the same protos and their
# comments: the services serve it, and proto-check finds it drifted too.
"$py" -m tools.openapi --out "$out/usagebilling/openapi.json"
# The same as a readable reference (proto-check compares it too).
mkdir -p "$out/docs"
"$py" -m tools.openapi --markdown --out "$out/docs/reference.md"
