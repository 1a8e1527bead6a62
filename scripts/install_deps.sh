#!/usr/bin/env bash
# Installs meshpost's build and test dependencies from Debian's archive (apt-get, as root).
# Idempotent: packages already present are skipped, so a second run costs a dpkg query.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libzmq3-dev cppzmq-dev libspdlog-dev libfmt-dev libsodium-dev
  libgtest-dev libgmock-dev
  libibverbs-dev librdmacm-dev
  pybind11-dev libtorch-dev python3-torch python3-dev python3-venv
  python3-setuptools python3-wheel python3-pip
  python3-pytest python3-numpy python3-matplotlib
  # fuzzing (scripts/fuzz.sh: clang's libFuzzer) and the format check (scripts/format.sh)
  clang clang-format
  # multi-host tests (tests/hosts): network namespaces, a local Slurm, manifest checks
  iproute2 slurm-wlm munge python3-yaml
  # soft-RoCE VM stage (scripts/rdma_vm/): QEMU and the guest image build
  qemu-system-x86 debootstrap e2fsprogs
)
if [[ "${MESHPOST_DEPS:-all}" == "core" ]]; then
  packages=(build-essential cmake ninja-build pkg-config libzmq3-dev cppzmq-dev libsodium-dev
            libspdlog-dev libfmt-dev libgtest-dev libgmock-dev libibverbs-dev librdmacm-dev)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} == 0 )); then
  echo "install_deps: all ${#packages[@]} packages present"
  exit 0
fi
echo "install_deps: installing ${missing[*]}"
if [[ $(id -u) -ne 0 ]]; then
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
