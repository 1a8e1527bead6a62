#!/usr/bin/env bash
# Installs dependencies, builds, and runs the AFD demo: a local cluster of 1 scheduler,
# 2 servers and 2 workers exchanging 128x7168 tensors, printing p50/p99 latency.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
echo "== C++ demo (build/meshpost_demo) =="
./build/meshpost_demo
if [[ -f scripts/demo_python.sh ]]; then
  echo "== Python demo (examples/afd_demo.py through python -m meshpost.launch) =="
  bash scripts/demo_python.sh
fi
