"""meshpost API with CUDA tensors and Request.outputs (run by scripts/gpu_check.sh on a GPU
machine, 2 workers x 2 servers):

    python -m meshpost.launch --workers 2 --servers 2 --scheduler-runs-script \
        tests/gpu/programs/outputs_cuda.py

Workers push a CUDA tensor produced on the current stream and pull into CUDA tensors
(need_event=True). Servers compute the answer straight into `req.outputs` on their current
stream and respond with need_event=True: over the same-host van with CUDA IPC the outputs
are the workers' own CUDA pull tensors mapped here (only the completion travels); elsewhere
they are fresh tensors sent as usual. Exits non-zero on any mismatch."""

import os
import sys

import torch

import meshpost

ROUNDS = int(os.environ.get("GPU_CHECK_ROUNDS", "50"))
ROWS, COLS = 128, 7168
role = os.environ["DMLC_ROLE"]
torch.cuda.set_device(int(os.environ.get("STEPMESH_GPU", "0")))

if role == "worker":
    with meshpost.Worker() as w:
        pulls = [torch.empty(ROWS, COLS, dtype=torch.bfloat16, device="cuda")
                 for _ in range(w.num_servers)]
        for r in range(ROUNDS):
            x = torch.full((ROWS, COLS), float(w.rank * 10 + r % 7), dtype=torch.bfloat16,
                           device="cuda") * 1.0
            h = w.push_pull([x], [0], pulls, [1] * w.num_servers, need_event=True)
            h.wait(timeout=60)
            for s, p in enumerate(pulls):
                want = float(w.rank * 10 + r % 7) * 2 + s
                if not torch.all(p == want).item():
                    print(f"worker {w.rank} round {r} server {s}: got {p.float().mean().item()} "
                          f"want {want}", flush=True)
                    sys.exit(1)
        print(f"PASS worker {w.rank}", flush=True)
elif role == "server":
    with meshpost.Server() as s:
        in_place = 0
        for r in range(ROUNDS):
            for req in s.get_batch(timeout=60):
                out = req.outputs[0]
                x = req.tensors[0].to("cuda", non_blocking=True)
                if out.is_cuda:
                    in_place += 1
                    torch.mul(x, 2, out=out)
                    out.add_(s.rank)
                    req.respond(need_event=True)
                else:
                    req.respond([(x * 2 + s.rank).cpu()])
        transports = set(s.transports().values())
        if transports <= {"cma", "cma-shm"} and os.environ.get("MESHPOST_CMA_GPU") != "staging":
            assert in_place == ROUNDS * s.num_workers, (in_place, transports)
        print(f"PASS server (outputs on the GPU: {in_place})", flush=True)
