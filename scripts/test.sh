#!/usr/bin/env bash
# Installs dependencies, builds, and runs every test: the GoogleTest suites (unit and
# multi-process integration, through ctest) and the Python suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
echo "== C++ tests (ctest) =="
# Each test has its own time limit (tests/CMakeLists.txt); --timeout is a backstop.
ctest --test-dir build --output-on-failure -j2 --timeout 600
if [[ -f scripts/test_python.sh ]]; then
  echo "== Python tests (pytest) =="
  bash scripts/test_python.sh
fi
echo "== all tests passed =="
