"""StepMesh-style program with CUDA tensors (run by scripts/gpu_check.sh on a GPU machine):

    python -m meshpost.launch --workers 2 --servers 2 --scheduler-runs-script \
        tests/gpu/programs/stepmesh_cuda.py

Workers push CUDA tensors produced by a kernel on the current stream (need_event=True),
order the consumer of the pulls with SimpleNotify.stream_wait_event, and check the values
on the GPU; servers fetch batches through block_now_stream_and_get_batch and answer from
CUDA tensors with need_event=True. Also exercises write_flag/wait_flag/seq_add_one under
CUDA Graph capture. Exits non-zero on any mismatch."""

import os
import sys

import torch

import fserver_lib as ps

ROUNDS = int(os.environ.get("GPU_CHECK_ROUNDS", "50"))
ROWS, COLS = 128, 7168
role = os.environ["DMLC_ROLE"]
gpu = int(os.environ.get("STEPMESH_GPU", "0"))

ps.init()
if role == "worker":
    torch.cuda.set_device(gpu)
    rank = int(os.environ.get("DMLC_NODE_RANK", "0"))
    servers = int(os.environ["DMLC_NUM_SERVER"])
    notify = ps.SimpleNotify()
    notify.init()
    pulls = [torch.empty(ROWS, COLS, dtype=torch.bfloat16, device="cuda") for _ in range(servers)]
    for r in range(ROUNDS):
        # A kernel on the current stream produces the push; need_event orders the send after it.
        x = torch.full((ROWS, COLS), float(rank * 100 + r % 7), dtype=torch.bfloat16, device="cuda")
        x = x * 1.0
        h = ps.push_pull([x], [0], pulls, [1] * servers, need_event=True)
        notify.stream_wait_event(h)
        total = sum(p.float().sum() for p in pulls)  # runs after the pulls landed
        notify.wait_event_done()
        want = sum(float(rank * 100 + r % 7) * 2 + s for s in range(servers)) * ROWS * COLS
        if abs(total.item() - want) > 1e-3 * abs(want) + 1:
            print(f"worker {rank} round {r}: got {total.item()} want {want}", flush=True)
            sys.exit(1)
    # Flags in CUDA Graphs: the seq counter lives on the device, so replays advance it.
    flag = torch.zeros(1, dtype=torch.int64, device="cuda")
    seq = torch.zeros(1, dtype=torch.int64, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            ps.seq_add_one(seq)
            ps.write_flag(flag, seq)
            ps.wait_flag(flag, seq)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert int(flag.item()) == 3 and int(seq.item()) == 3, (flag.item(), seq.item())
    print(f"PASS worker {rank}", flush=True)
elif role == "server":
    torch.cuda.set_device(gpu)
    notify = ps.SimpleNotify()
    notify.init()
    answered = 0
    while answered < ROUNDS * int(os.environ["DMLC_NUM_WORKER"]):
        notify.block_now_stream_and_get_batch()
        batch = notify.get_future_batch_data()
        for handler, tensors, keys in batch:
            out = tensors[0].to("cuda") * 2 + int(os.environ.get("DMLC_NODE_RANK", "0"))
            ps.respond([out], handler, need_event=True)
            answered += 1
    print("PASS server", flush=True)
ps.stop()
