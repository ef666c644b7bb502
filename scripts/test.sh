#!/usr/bin/env sh
# Set up (first time) and run the default test suite. Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/pytest ] || ! .venv/bin/python -c "import node, pytest_asyncio, hypothesis, mypy, xdist" 2>/dev/null; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[test]"
fi
# The browser tests drive Debian's chromium; the alert rules are checked with promtool (Debian's prometheus).
if ! command -v chromium >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends chromium prometheus >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium prometheus >/dev/null; }
    else
        echo "note: install Debian's chromium and prometheus packages for the browser and alert-rule tests" >&2
    fi
fi
.venv/bin/ruff check .
.venv/bin/mypy
# Two workers: most tests spend their time waiting on real servers and processes, not on the CPU.
exec .venv/bin/python -m pytest -n 2 "$@"
