"""Trace capture through the pythonic API: argv = trace_dir iterations slow_role slow_rank
sleep_ms [mode (default all)]. The slow rank sleeps sleep_ms per request: a server in its compute (between
get_batch and respond), a worker before each push_pull (so its requests arrive late)."""
import sys
import time

import torch

import meshpost
from common import passed, rank, role

trace_dir, iterations, slow_role, slow_rank, sleep_ms = (
    sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
slow = role() == slow_role and rank() == slow_rank
mode = sys.argv[6] if len(sys.argv) > 6 else "all"
opts = dict(trace=mode, trace_dir=trace_dir)

if role() == "worker":
    with meshpost.Worker(**opts) as w:
        for i in range(iterations):
            if slow:
                time.sleep(sleep_ms / 1000)
            outs = [torch.zeros(256) for _ in range(w.num_servers)]
            h = w.push_pull([torch.full((1024,), float(i))], [7], outs, [9] * len(outs))
            h.wait(timeout=60)
            for out in outs:
                assert torch.equal(out, torch.full((256,), float(i))), out
        w.barrier(servers=True, workers=True, timeout=60)
elif role() == "server":
    with meshpost.Server(**opts) as s:
        for i in range(iterations):
            batch = s.get_batch(timeout=60)
            if slow:
                time.sleep(sleep_ms / 1000)
            for req in batch:
                req.respond([req.tensors[0][:256].clone()])
        s.barrier(servers=True, workers=True, timeout=60)
passed()
