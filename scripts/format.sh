#!/usr/bin/env bash
# Formats meshpost's C++ sources with clang-format and the root .clang-format.
#   bash scripts/format.sh            rewrite files in place
#   bash scripts/format.sh --check    change nothing; list unformatted files, exit 1 if any
#   bash scripts/format.sh [--check] FILE...   only these files
# Files: every tracked *.h / *.cc (git ls-files), so build trees and .venv are never touched.
# CLANG_FORMAT=/path/to/clang-format picks the binary (default: clang-format on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
if [[ "${1:-}" == "--check" ]]; then
  check=1
  shift
fi
case "${1:-}" in
  -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
  -*) echo "format.sh: unknown option '$1'; expected --check, --help or file names" >&2; exit 2 ;;
esac

cf="${CLANG_FORMAT:-clang-format}"
if ! command -v "$cf" >/dev/null 2>&1; then
  echo "format.sh: '$cf' not found; install it (Debian: apt-get install clang-format)" \
       "or set CLANG_FORMAT" >&2
  exit 2
fi

if (( $# > 0 )); then
  files=("$@")
else
  mapfile -t files < <(git ls-files '*.h' '*.cc')
fi
if (( ${#files[@]} == 0 )); then
  echo "format.sh: no files to format"
  exit 0
fi

if (( check == 0 )); then
  "$cf" -i --style=file "${files[@]}"
  echo "format.sh: formatted ${#files[@]} files with $("$cf" --version | head -1)"
  exit 0
fi

bad=()
for f in "${files[@]}"; do
  if ! "$cf" --style=file --dry-run -Werror "$f" >/dev/null 2>&1; then
    bad+=("$f")
  fi
done
if (( ${#bad[@]} > 0 )); then
  echo "format.sh --check: ${#bad[@]} of ${#files[@]} files are not clang-formatted:" >&2
  printf '  %s\n' "${bad[@]}" >&2
  echo "run: bash scripts/format.sh ${bad[*]}" >&2
  exit 1
fi
echo "format.sh --check: all ${#files[@]} files formatted"
