#!/usr/bin/env bash
# Runs clang-tidy with the root .clang-tidy over meshpost's C++ sources (docs/development.md).
#   bash scripts/tidy.sh                 every tracked *.cc except bindings/ (needs libtorch)
#   bash scripts/tidy.sh FILE.cc...      only these files
#   bash scripts/tidy.sh --fix FILE.cc   apply the fixes clang-tidy offers
# Uses build/compile_commands.json (run scripts/build.sh first; BUILD_DIR=... to pick another
# tree). Exits 1 when clang-tidy reports a warning. Not part of CI yet.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cxx_tool.sh

build="${BUILD_DIR:-build}"
cxx_tool_args tidy.sh --fix "$@"
fix=()
(( flag == 0 )) || fix=(--fix)
cxx_tool_find tidy.sh CLANG_TIDY clang-tidy clang-tidy || { echo "$cxx_tool_missing" >&2; exit 2; }
ct=$tool
[[ -f "$build/compile_commands.json" ]] || {
  echo "tidy.sh: $build/compile_commands.json missing; run 'bash scripts/build.sh' first" >&2
  exit 2; }
cxx_tool_files '^bindings/' '*.cc'
out=$(mktemp)
trap 'rm -f "$out"' EXIT
rc=0
for f in "${files[@]}"; do
  "$ct" -p "$build" --quiet "${fix[@]}" "$f" 2>/dev/null | tee -a "$out" || rc=1
done
n=$(grep -c 'warning:' "$out" || true)
echo "tidy.sh: $n warnings in ${#files[@]} files"
(( n == 0 && rc == 0 ))
