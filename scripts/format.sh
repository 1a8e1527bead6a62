#!/usr/bin/env bash
# Formats meshpost's C++ sources with clang-format and the root .clang-format.
#   bash scripts/format.sh            rewrite files in place
#   bash scripts/format.sh --check    change nothing; list unformatted files, exit 1 if any
#   bash scripts/format.sh [--check] FILE...   only these files
# Files: every tracked *.h / *.cc (git ls-files), so build trees and .venv are never touched.
# CLANG_FORMAT=/path/to/clang-format picks the binary (default: clang-format on PATH).
# Without clang-format, --check skips (exit 0) saying why; rewriting fails (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cxx_tool.sh

cxx_tool_args format.sh --check "$@"
check=$flag
if ! cxx_tool_find format.sh CLANG_FORMAT clang-format clang-format; then
  if (( check )); then
    echo "format.sh --check: SKIPPED: $cxx_tool_missing"
    exit 0
  fi
  echo "$cxx_tool_missing" >&2
  exit 2
fi
cf=$tool
cxx_tool_files "" '*.h' '*.cc'
if (( ${#files[@]} == 0 )); then
  echo "format.sh: no files to format"
  exit 0
fi

if (( check == 0 )); then
  "$cf" -i --style=file "${files[@]}"
  echo "format.sh: formatted ${#files[@]} files with $("$cf" --version | head -1)"
  exit 0
fi

# One clang-format run over every file (one process per file takes minutes on a loaded box);
# each unformatted file yields a "FILE:LINE:COL: error: code should be clang-formatted" line.
rc=0
out=$("$cf" --style=file --dry-run -Werror --ferror-limit=1 "${files[@]}" 2>&1) || rc=$?
mapfile -t bad < <(grep -E '^[^ ].*:[0-9]+:[0-9]+: (error|warning): code should be clang-formatted' \
                     <<<"$out" | sed -E 's/:[0-9]+:[0-9]+: .*$//' | sort -u)
if (( rc != 0 && ${#bad[@]} == 0 )); then
  echo "format.sh --check: $cf failed (exit $rc):" >&2
  printf '%s\n' "$out" | head -20 >&2
  exit 2
fi
if (( ${#bad[@]} > 0 )); then
  echo "format.sh --check: ${#bad[@]} of ${#files[@]} files are not clang-formatted" \
       "($("$cf" --version | head -1)):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  if (( ${#bad[@]} <= 10 )); then
    echo "run: bash scripts/format.sh ${bad[*]}" >&2
  else
    echo "run: bash scripts/format.sh (every file) or bash scripts/format.sh FILE..." >&2
  fi
  exit 1
fi
echo "format.sh --check: all ${#files[@]} files formatted"
