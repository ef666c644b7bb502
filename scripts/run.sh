#!/usr/bin/env sh
# Set up (first time) and run a node with its store under ./data; prints the URL it listens on.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/wardsync ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e .
fi
if [ ! -f wardsync.toml ]; then
    # Phường Bến Thành; replace the agency code with the one the city assigned to your unit.
    .venv/bin/wardsync init --unit "${WARDSYNC_UNIT:-26743}" --agency-code "${WARDSYNC_AGENCY:-000.00.17.H29}" \
        --out wardsync.toml
fi
exec .venv/bin/wardsync serve --config wardsync.toml "$@"
