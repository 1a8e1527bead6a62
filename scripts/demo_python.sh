#!/usr/bin/env bash
# Runs the Python AFD demo (2 attention workers x 2 FFN servers, 3 micro-batch stages)
# through the local launcher. Installs the package into .venv first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import meshpost, fserver_lib" 2>/dev/null; then
  .venv/bin/pip install --quiet --no-build-isolation --no-index .
fi
exec timeout --kill-after=30 600 .venv/bin/python -m meshpost.launch \
  --workers 2 --servers 2 examples/afd_demo.py "$@"
