#!/usr/bin/env bash
# For a machine with an NVIDIA GPU and driver: builds meshpost with CUDA forced on, runs the
# device tests (tests/gpu, C++), the fake-device suite, and two Python programs with CUDA
# tensors (tests/gpu/programs: StepMesh-style fserver_lib, and the meshpost API computing
# into Request.outputs) over tcp, the same-host van (CUDA IPC, and staging), and rdma (GPUDirect) when
# the machine has an RDMA device (/sys/class/infiniband). Needs the CUDA toolkit (nvcc)
# and a CUDA-enabled torch in the interpreter given by PYTHON (default .venv/bin/python,
# made from /usr/bin/python3 like scripts/test_python.sh).
#   bash scripts/gpu_check.sh            # everything
#   GPU_CHECK_ROUNDS=500 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU/driver here (nvidia-smi -L failed); nothing to check" >&2
  exit 2
fi
nvidia-smi -L

echo "== build (MESHPOST_WITH_CUDA=ON) =="
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMESHPOST_WITH_CUDA=ON \
  -DMESHPOST_WITH_RDMA=ON >/dev/null
ninja -C build-gpu -j"$(nproc)"

echo "== C++: CUDA backend on the device, fake-device cluster =="
timeout --kill-after=30 900 build-gpu/tests/gpu_cuda_test
timeout --kill-after=30 900 build-gpu/tests/gpu_fake_test
timeout --kill-after=30 900 build-gpu/tests/tensor_test

PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
  PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: $PYTHON's torch has no CUDA (torch.cuda.is_available() is False);" \
       "set PYTHON to an interpreter with a CUDA torch to run the Python checks" >&2
  exit 3
fi
echo "== Python: install against $("$PYTHON" -c 'import torch; print(torch.__version__)') =="
MESHPOST_WITH_CUDA=ON "$PYTHON" -m pip install --quiet --no-build-isolation --no-index .
"$PYTHON" -c 'from meshpost import _meshpost; ok, why = _meshpost.cuda_status(); assert ok, why'

# cma: CUDA IPC (the default); cma@staging: the same-host van with MESHPOST_CMA_GPU=staging.
transports=(tcp cma cma@staging)
# rdma forced between processes of this host: CUDA tensors travel by GPUDirect (docs/gpu.md);
# MESHPOST_RDMA_GPU=staging in the environment checks the staged path instead.
if compgen -G "/sys/class/infiniband/*" >/dev/null; then
  transports+=(rdma)
else
  echo "gpu_check: no RDMA device (/sys/class/infiniband is empty): GPUDirect not checked"
fi
for spec in "${transports[@]}"; do
  transport=${spec%@*}
  cma_gpu=ipc
  [[ $spec == *@staging ]] && cma_gpu=staging
  for program in stepmesh_cuda.py outputs_cuda.py; do
    echo "== $program, 2 workers x 2 servers, transport=$spec =="
    (cd tests/python && MESHPOST_CMA_GPU=$cma_gpu timeout --kill-after=30 900 \
       "../../$PYTHON" -m meshpost.launch --workers 2 --servers 2 --transport "$transport" \
       --scheduler-runs-script "../gpu/programs/$program")
  done
done
echo "== gpu_check: all passed =="
