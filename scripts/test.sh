#!/usr/bin/env sh
# Set up (first time) and run the default test suite. Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/pytest ] || ! .venv/bin/python -c "import node, pytest_asyncio, hypothesis, mypy" 2>/dev/null; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[test]"
fi
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
