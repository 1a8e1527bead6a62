"""StepMesh-style program: every role (scheduler too) calls init() and stop(). Each worker
pushes a vector; the server answers every worker with the sum over all workers."""
import os

import torch

import fserver_lib as ps
from common import passed, rank, role

ps.init()
W = int(os.environ["DMLC_NUM_WORKER"])
if role() == "worker":
    x = torch.arange(16, dtype=torch.float32) * (rank() + 1)
    out = torch.zeros(16)
    h = ps.push_pull([x], [7], [out], [8])
    assert isinstance(h, int) and h > 0
    ps.wait(h)
    expected = torch.arange(16, dtype=torch.float32) * sum(r + 1 for r in range(W))
    assert torch.equal(out, expected), (out, expected)
elif role() == "server":
    batch = ps.get_batch()
    assert len(batch) == W
    total = sum(tensors[0] for _, tensors, _ in batch)
    for handler, tensors, keys in batch:
        assert keys == [7] and len(tensors) == 1
        assert tensors[0].dtype == torch.float32 and tuple(tensors[0].shape) == (16,)
        ps.respond([total], handler)
ps.stop()
passed()
