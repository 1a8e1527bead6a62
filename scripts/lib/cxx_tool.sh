# Sourced by scripts/format.sh and scripts/tidy.sh: the start both share (their arguments,
# finding the clang tool, the list of files). The caller has run `set -euo pipefail` and
# `cd` to the repository root. Sets globals:
#   cxx_tool_args NAME FLAG ARG...   flag=1 and drops it when the first ARG is FLAG (else
#                                    flag=0); args=(the other ARGs). -h/--help prints the
#                                    calling script's header comment and exits 0; any other
#                                    -option exits 2 naming it.
#   cxx_tool_find NAME ENVVAR BINARY PACKAGE
#                                    tool=$ENVVAR or BINARY; returns 1 with the reason in
#                                    cxx_tool_missing when it is not on PATH.
#   cxx_tool_files EXCLUDE PATTERN...  files=(args) when file names were given, else every
#                                    tracked file matching a git PATTERN whose path does not
#                                    match the extended regex EXCLUDE ("" excludes nothing).

cxx_tool_args() {
  local name=$1 want=$2
  shift 2
  flag=0
  if [[ "${1:-}" == "$want" ]]; then
    flag=1
    shift
  fi
  case "${1:-}" in
    -h|--help)
      # The script's header: the comment lines after the shebang.
      sed -n '2,/^[^#]/p' "$0" | sed -n 's/^# \{0,1\}//p'
      exit 0 ;;
    -*)
      echo "$name: unknown option '$1'; expected $want, --help or file names" >&2
      exit 2 ;;
  esac
  args=("$@")
}

cxx_tool_find() {
  local name=$1 envvar=$2 binary=$3 package=$4
  tool="${!envvar:-$binary}"
  cxx_tool_missing=""
  if ! command -v "$tool" >/dev/null 2>&1; then
    cxx_tool_missing="$name: '$tool' not found; install it (Debian: apt-get install $package) or set $envvar"
    return 1
  fi
}

cxx_tool_files() {
  local exclude=$1
  shift
  if (( ${#args[@]} > 0 )); then
    files=("${args[@]}")
  elif [[ -n "$exclude" ]]; then
    mapfile -t files < <(git ls-files -- "$@" | grep -Ev -- "$exclude" || true)
  else
    mapfile -t files < <(git ls-files -- "$@")
  fi
}
