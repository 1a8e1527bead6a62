#!/usr/bin/env bash
# Runs clang-tidy with the root .clang-tidy over meshpost's C++ sources (docs/development.md).
#   bash scripts/tidy.sh                 every tracked *.cc except bindings/ (needs libtorch)
#   bash scripts/tidy.sh FILE.cc...      only these files
#   bash scripts/tidy.sh --fix FILE.cc   apply the fixes clang-tidy offers
# Uses build/compile_commands.json (run scripts/build.sh first; BUILD_DIR=... to pick another
# tree). Exits 1 when clang-tidy reports a warning. Not part of CI yet.
set -euo pipefail
cd "$(dirname "$0")/.."
build="${BUILD_DIR:-build}"
fix=()
if [[ "${1:-}" == "--fix" ]]; then
  fix=(--fix)
  shift
fi
case "${1:-}" in
  -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
  -*) echo "tidy.sh: unknown option '$1'; expected --fix, --help or file names" >&2; exit 2 ;;
esac
ct="${CLANG_TIDY:-clang-tidy}"
command -v "$ct" >/dev/null 2>&1 || {
  echo "tidy.sh: '$ct' not found; install it (Debian: apt-get install clang-tidy)" \
       "or set CLANG_TIDY" >&2; exit 2; }
[[ -f "$build/compile_commands.json" ]] || {
  echo "tidy.sh: $build/compile_commands.json missing; run 'bash scripts/build.sh' first" >&2
  exit 2; }
if (( $# > 0 )); then
  files=("$@")
else
  mapfile -t files < <(git ls-files '*.cc' | grep -v '^bindings/')
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
rc=0
for f in "${files[@]}"; do
  "$ct" -p "$build" --quiet "${fix[@]}" "$f" 2>/dev/null | tee -a "$out" || rc=1
done
n=$(grep -c 'warning:' "$out" || true)
echo "tidy.sh: $n warnings in ${#files[@]} files"
(( n == 0 && rc == 0 ))
