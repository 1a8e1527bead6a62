#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang (-fsanitize=fuzzer,address,undefined)
# into build-fuzz/ and runs each for a bounded time on its seed corpus (fuzz/corpus/<name>).
# A crash, leak or sanitizer report fails the script and leaves the reproducer in
# build-fuzz/artifacts/. Skips with a reason when clang++ or its fuzzer runtime is missing.
#   FUZZ_SECONDS=20 (per target)   FUZZ_TARGETS="codec auth" (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-20}"
targets="${FUZZ_TARGETS:-codec auth rdma_wire cma_frames}"
cxx="${FUZZ_CXX:-$(command -v clang++ || command -v clang++-14 || true)}"
if [[ -z "$cxx" ]]; then
  echo "fuzz: SKIPPED: clang++ not found (apt-get install clang)"
  exit 0
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' \
  > "$probe/p.cc"
if ! "$cxx" -fsanitize=fuzzer "$probe/p.cc" -o "$probe/p" 2>/dev/null; then
  echo "fuzz: SKIPPED: $cxx cannot link -fsanitize=fuzzer (libFuzzer runtime missing)"
  exit 0
fi

if [[ " $targets " == *" rdma_wire "* && ! -f /usr/include/infiniband/verbs.h ]]; then
  echo "fuzz: rdma_wire SKIPPED: infiniband/verbs.h not found (apt-get install libibverbs-dev)"
  targets="${targets/rdma_wire/}"
fi

out=build-fuzz
mkdir -p "$out/artifacts"
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I. $(pkg-config --cflags libzmq libsodium))
libs=($(pkg-config --libs libsodium) -lspdlog -lfmt -lpthread)
common_src=(common/status.cc common/env.cc common/auth.cc common/logging.cc common/log_level.cc
            tensor/dtype.cc tensor/tensor_view.cc tensor/device_backend.cc van/codec.cc)

# Each source is compiled once into build-fuzz/obj (recompiled when it or any header is
# newer), so four targets cost one compile of the shared code.
newest_header=$(ls -t common/*.h tensor/*.h van/*.h van/*/*.h | head -1)
object() {  # source -> prints its object path, compiling it when stale
  local src=$1 obj="$out/obj/${1%.cc}.o"
  mkdir -p "$(dirname "$obj")"
  if [[ ! -f "$obj" || "$src" -nt "$obj" || "$newest_header" -nt "$obj" ]]; then
    "$cxx" "${flags[@]}" -c "$src" -o "$obj" >&2
  fi
  echo "$obj"
}

build() {  # name, then extra sources and -l flags
  local name=$1; shift
  local bin="$out/${name}_fuzz" objs=() extra_libs=() a
  echo "fuzz: building $name"
  for a in "fuzz/${name}_fuzz.cc" "${common_src[@]}" "$@"; do
    if [[ "$a" == -* ]]; then extra_libs+=("$a"); else objs+=("$(object "$a")"); fi
  done
  "$cxx" "${flags[@]}" "${objs[@]}" "${libs[@]}" "${extra_libs[@]}" -o "$bin"
}

for t in $targets; do
  case "$t" in
    codec|auth) build "$t" ;;
    rdma_wire) build "$t" van/rdma/rdma_wire.cc van/rdma/verbs_ibv.cc -libverbs ;;
    cma_frames) build "$t" van/cma/cma_van.cc van/cma/cma_device.cc van/cma/frame_ring.cc van/device_copy.cc \
                  van/delivery.cc common/net.cc common/affinity.cc tensor/shared_memory.cc ;;
    *) echo "fuzz: unknown target $t"; exit 2 ;;
  esac
done

status=0
for t in $targets; do
  corpus_seed="fuzz/corpus/$t"
  work="$out/corpus/$t"  # grows across runs; the seed corpus in the repo stays as is
  mkdir -p "$work"
  echo "fuzz: running $t for ${seconds}s"
  # -rss_limit_mb keeps a runaway allocation a finding instead of an OOM kill.
  if ! PS_VERBOSE=0 timeout --kill-after=30 $((seconds + 120)) \
      "$out/${t}_fuzz" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=25 \
      -artifact_prefix="$out/artifacts/${t}-" -print_final_stats=1 \
      "$work" "$corpus_seed" > "$out/$t.log" 2>&1; then
    echo "fuzz: $t FAILED; last lines of $out/$t.log:"
    tail -40 "$out/$t.log"
    status=1
  else
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$out/$t.log" | tail -1 || true
  fi
done
exit $status
