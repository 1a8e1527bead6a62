#!/usr/bin/env bash
# Builds and installs the Python package into .venv (created from /usr/bin/python3 with
# the system site-packages, where Debian's torch lives) and runs the pytest suite.
# Offline: no package index is contacted. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install --quiet --no-build-isolation --no-index .
# Run from tests/python so `import meshpost` resolves to the installed package.
cd tests/python
exec timeout --kill-after=30 "${MESHPOST_PYTEST_TIMEOUT:-1200}" \
  ../../.venv/bin/python -m pytest -q "$@"
