#!/usr/bin/env bash
# Builds and runs meshpost's C++ suites under sanitizers (docs/development.md):
#   asan: AddressSanitizer + LeakSanitizer + UBSan (non-recoverable) over the unit suites
#         (common, tensor, launch, van, ps, trace recorder), the van conformance suite, the
#         RDMA suites (fake fabric), the fake-device GPU suites (cma CUDA IPC included) and
#         the multi-process integration suite -> build-asan/
#   tsan: ThreadSanitizer over the van and ps unit suites (trace recorder included) and the
#         van conformance suite (minus its three bulk-volume tests) -> build-tsan/
# Only the targets those suites need are built (RelWithDebInfo at -O1, line tables only, asserts
# on). Every process writes its sanitizer reports to a log directory, so a report from a
# child process whose exit a test tolerates (a killed peer, a node told to fail) still fails
# this script.
#   bash scripts/test_sanitizers.sh [asan] [tsan]     (default: both)
# MESHPOST_SANITIZER_JOBS (default: nproc) sets ninja/ctest parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
jobs="${MESHPOST_SANITIZER_JOBS:-$(nproc)}"
supp="$root/tests/sanitizers"

stages=("$@")
(( ${#stages[@]} > 0 )) || stages=(asan tsan)
for s in "${stages[@]}"; do
  [[ "$s" == asan || "$s" == tsan ]] || {
    echo "test_sanitizers.sh: unknown stage '$s'; expected asan and/or tsan" >&2; exit 2; }
done

# A box without the sanitizer runtimes, or whose kernel/container refuses them (ptrace for
# LeakSanitizer, the memory layout ThreadSanitizer needs), skips with the reason instead of
# reporting a failure the code did not cause.
probe() {  # probe <flags> -> 0 if a threaded program builds and runs clean
  local dir
  dir=$(mktemp -d)
  printf '%s\n' '#include <thread>' \
    'int main() { int* p = new int[4]; std::thread t([p] { p[1] = 1; }); t.join();' \
    '  int r = p[1] - 1; delete[] p; return r; }' > "$dir/p.cc"
  local rc=0
  { "${CXX:-c++}" $1 -pthread "$dir/p.cc" -o "$dir/p" && "$dir/p"; } >"$dir/log" 2>&1 || rc=$?
  (( rc == 0 )) || sed 's/^/    /' "$dir/log" | tail -5 >&2
  rm -rf "$dir"
  return $rc
}

configure_and_build() {  # <dir> <sanitize> <targets...>
  local dir=$1 san=$2
  shift 2
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DMESHPOST_SANITIZE="$san" \
    -DMESHPOST_BUILD_PYTHON=OFF >/dev/null
  # The RDMA suites exist only where cmake found libibverbs.
  local targets=() t all
  all=$(ninja -C "$dir" -t targets all)
  for t in "$@"; do
    if [[ "$t" == rdma_* ]] && ! grep -q "^$t: phony" <<<"$all"; then
      echo "  (skipping $t: RDMA van not built here)"
      continue
    fi
    targets+=("$t")
  done
  timeout --kill-after=30 2400 ninja -C "$dir" -j"$jobs" "${targets[@]}"
}

run_ctest() {  # <dir> <logdir> [exclude-regex]: unbuilt suites (*_NOT_BUILT) are excluded
  local dir=$1 logs=$2 exclude='_NOT_BUILT$'
  [[ -z "${3:-}" ]] || exclude="$exclude|$3"
  rm -rf "$logs"
  mkdir -p "$logs"
  local rc=0
  timeout --kill-after=30 1500 ctest --test-dir "$dir" --output-on-failure -j"$jobs" \
    --timeout 600 -E "$exclude" || rc=$?
  if compgen -G "$logs/*" >/dev/null; then
    echo "== sanitizer reports (from $logs) ==" >&2
    for f in "$logs"/*; do
      echo "--- $f" >&2
      cat "$f" >&2
    done
    rc=1
  fi
  return $rc
}

status=0
for stage in "${stages[@]}"; do
  start=$SECONDS
  case "$stage" in
    asan)
      echo "== sanitizers: AddressSanitizer + UBSan (build-asan) =="
      if ! probe "-fsanitize=address,undefined -fno-sanitize-recover=all"; then
        echo "SKIP asan: this host cannot build or run -fsanitize=address,undefined (above)"
        continue
      fi
      configure_and_build build-asan "address,undefined" \
        common_test tensor_test launch_test van_test van_conformance_test cma_shared_test cma_progress_test \
        cma_device_test gpu_fake_test ps_unit_test trace_recorder_test integration_test \
        meshpost_itest_node rdma_test rdma_cluster_test
      logs="$root/build-asan/sanitizer-logs"
      export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:strict_string_checks=1:check_initialization_order=1:detect_stack_use_after_return=1:log_path=$logs/asan:suppressions=$supp/asan.supp"
      export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
      export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$logs/ubsan:suppressions=$supp/ubsan.supp"
      run_ctest build-asan "$logs" || status=1
      unset ASAN_OPTIONS LSAN_OPTIONS UBSAN_OPTIONS
      ;;
    tsan)
      echo "== sanitizers: ThreadSanitizer (build-tsan) =="
      if ! probe "-fsanitize=thread"; then
        echo "SKIP tsan: this host cannot build or run -fsanitize=thread (above)"
        continue
      fi
      configure_and_build build-tsan thread van_test van_conformance_test cma_shared_test cma_progress_test \
        ps_unit_test trace_recorder_test
      logs="$root/build-tsan/sanitizer-logs"
      export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=4:log_path=$logs/tsan:suppressions=$supp/tsan.supp"
      # The conformance suite's bulk-volume tests (64 MiB messages, hundreds of 1 MiB frames)
      # take minutes under TSan and add no thread interleavings the other tests lack.
      run_ctest build-tsan "$logs" \
        'Large64MiBToVanBufferAndToRegisteredMemory|ManyInFlightAllOwnersReleased|ManySegmentsLandInRegisteredDestinations' \
        || status=1
      unset TSAN_OPTIONS
      ;;
  esac
  echo "== sanitizers: $stage took $((SECONDS - start)) s =="
done
exit $status
