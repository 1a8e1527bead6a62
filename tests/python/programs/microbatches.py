"""3 micro-batches in flight per worker (distinct keys), waited in reverse order."""
import torch

import meshpost
from common import passed, rank, role

STAGES = 3
ITERS = 10
if role() == "worker":
    with meshpost.Worker() as w:
        S = w.num_servers
        for it in range(ITERS):
            handles, pulls = [], []
            for st in range(STAGES):
                x = torch.full((8,), float(it * 10 + st), dtype=torch.float32)
                pull = [torch.zeros(8) for _ in range(S)]
                handles.append(w.push_pull([x], [st], pull, [100 + st] * S))
                pulls.append(pull)
            for st in reversed(range(STAGES)):
                handles[st].wait(timeout=30)
                for s in range(S):
                    assert torch.all(pulls[st][s] == it * 10 + st + 0.5 * s), (st, s, pulls[st][s])
            assert len({h.id for h in handles}) == STAGES
elif role() == "server":
    with meshpost.Server() as s:
        for it in range(ITERS * STAGES):
            batch = s.get_batch(timeout=30)
            keys = {tuple(r.keys) for r in batch}
            assert len(keys) == 1, keys  # one micro-batch per batch, FIFO per worker
            stage = batch[0].keys[0]
            assert stage == it % STAGES
            for r in batch:
                r.respond([r.tensors[0] + 0.5 * s.rank])
passed()
