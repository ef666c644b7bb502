#!/usr/bin/env sh
# Set up (first time) and run the demo: the national portal and city system stand-ins and a node wired
# to them, all on loopback, stores under ./data/demo. Prints the node's URL. Extra arguments go to
# `wardsync demo` (for example --listen 127.0.0.1:9000).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/wardsync ] || ! .venv/bin/python -c "import node, adapters, simulations" 2>/dev/null; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e .
fi
exec .venv/bin/wardsync demo "$@"
