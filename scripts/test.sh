#!/usr/bin/env bash
# Installs dependencies, builds, and runs every test: the GoogleTest suites (unit and
# multi-process integration, through ctest) and the Python suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every stage banner starts with the seconds since this script began: where CI time goes.
bash scripts/install_deps.sh
# ---- format check (issue 8; docs/development.md) ----
# Enforced once the tree has been formatted: the commit that formats it creates the marker
# file .format-enforced at the root. Before that, a no-op that says so. Without clang-format
# the check skips with the reason (scripts/format.sh).
if [[ -f .format-enforced ]]; then
  echo "== [${SECONDS} s] format check (scripts/format.sh --check) =="
  bash scripts/format.sh --check
else
  echo "== [${SECONDS} s] format check SKIPPED (no .format-enforced marker: the tree is not formatted yet) =="
fi
# ---- end format check ----
bash scripts/build.sh
echo "== [${SECONDS} s] C++ tests (ctest) =="
# Each test has its own time limit (tests/CMakeLists.txt); --timeout is a backstop.
ctest --test-dir build --output-on-failure -j2 --timeout 600
# ---- sanitizers (issue 8 build hygiene; docs/development.md) ----
# ASan+UBSan over the unit, conformance, RDMA-fake and integration suites; TSan over the van
# and ps unit suites and the conformance suite. Own build trees (build-asan, build-tsan);
# skips with a reason on hosts whose toolchain or kernel cannot run a sanitizer.
# MESHPOST_SKIP_SANITIZERS=1 skips the stage (e.g. a quick local run).
if [[ "${MESHPOST_SKIP_SANITIZERS:-0}" == 1 ]]; then
  echo "== [${SECONDS} s] sanitizer stage SKIPPED (MESHPOST_SKIP_SANITIZERS=1) =="
else
  echo "== [${SECONDS} s] C++ tests under sanitizers (scripts/test_sanitizers.sh) =="
  timeout --kill-after=30 1800 bash scripts/test_sanitizers.sh
fi
# ---- end sanitizers ----
if [[ -f scripts/test_python.sh ]]; then
  echo "== [${SECONDS} s] Python tests (pytest), transport chosen automatically (same-host: cma) =="
  bash scripts/test_python.sh
  echo "== [${SECONDS} s] Python tests (pytest), MESHPOST_TRANSPORT=tcp =="
  (cd tests/python && MESHPOST_TRANSPORT=tcp timeout --kill-after=30 1200 \
     ../../.venv/bin/python -m pytest -q)
  # ---- hosts (issue 15): many hosts on one machine -------------------------------------
  # Network-namespace "hosts" (cross-host tcp, same-host cma, a cut link) and a real local
  # Slurm (srun + sbatch). Each test skips with its reason where namespaces or Slurm cannot
  # run; fixtures and scripts/slurm_local remove what they created, also on failure.
  echo "== [${SECONDS} s] Multi-host tests (tests/hosts: network namespaces, Slurm) =="
  (cd tests/hosts && timeout --kill-after=30 900 ../../.venv/bin/python -m pytest -q -rs)
  # ---- end hosts ------------------------------------------------------------------------
fi
# ---- fuzzing (issue 10, owner: sec): every decoder of untrusted bytes, 20 s per target ----
echo "== [${SECONDS} s] fuzzing (libFuzzer; skips with a reason where clang's fuzzer runtime is missing) =="
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash scripts/fuzz.sh
# ---- end fuzzing ----
# >>> RDMA on soft-RoCE VMs (issue 13; scripts/rdma_vm/, docs/rdma.md) >>>
# The RDMA van on a real verbs stack (rdma_rxe in QEMU guests; one guest, then two joined by
# a virtual link), using the build above and the .venv of the Python stage. Bounded by
# MESHPOST_RDMA_VM_BUDGET (2400 s, image build included; measured in docs/rdma.md); skips
# with the reason where QEMU/root/the Debian archive are missing. MESHPOST_SKIP_RDMA_VM=1
# skips it.
echo "== [${SECONDS} s] RDMA tests on soft-RoCE VMs (MESHPOST_SKIP_RDMA_VM=1 skips them) =="
timeout --kill-after=30 $(( ${MESHPOST_RDMA_VM_BUDGET:-2400} + 120 )) bash scripts/rdma_vm/stage.sh build
# <<< RDMA on soft-RoCE VMs <<<
echo "== [${SECONDS} s] all tests passed =="
