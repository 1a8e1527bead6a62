#!/usr/bin/env bash
# Configures and builds meshpost's C++ targets into build/ (Ninja, RelWithDebInfo).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMESHPOST_WITH_RDMA=ON "$@" >/dev/null
ninja -C build -j"$(nproc)"
