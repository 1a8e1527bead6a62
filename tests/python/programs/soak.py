"""3000 round trips: after warm-up, resident memory must not keep growing (bounded
handle/request tables, no leaked tensors or buffers)."""
import os

import torch

import meshpost
from common import passed, role, rss_bytes

ITERS = int(os.environ.get("SOAK_ITERS", "3000"))
WARMUP = 500
LIMIT = 24 << 20  # generous: allocator noise, not a leak of 3000 x 64 KiB

if role() == "worker":
    with meshpost.Worker() as w:
        S = w.num_servers
        x = torch.ones(128, 128, dtype=torch.float32)
        for i in range(ITERS):
            if i == WARMUP:
                base = rss_bytes()
            pull = [torch.empty(128, 128) for _ in range(S)]
            h = w.push_pull([x, torch.full((4,), i, dtype=torch.int32)], [0, 1], pull, [2] * S)
            h.wait(timeout=30)
            if i % 500 == 0:
                assert torch.all(pull[-1] == 2) and h.done()
        grown = rss_bytes() - base
        print(f"worker rss growth after warm-up: {grown / 1e6:.1f} MB", flush=True)
        assert grown < LIMIT, grown
elif role() == "server":
    with meshpost.Server() as s:
        for i in range(ITERS):
            if i == WARMUP:
                base = rss_bytes()
            for r in s.get_batch(timeout=30):
                assert int(r.tensors[1][0]) == i
                r.respond([r.tensors[0] * 2])
        grown = rss_bytes() - base
        print(f"server rss growth after warm-up: {grown / 1e6:.1f} MB", flush=True)
        assert grown < LIMIT, grown
passed()
