"""register_recv_buffer: pushes land in the registered tensor (in place) and the tensors
get_batch returns view that memory."""
import torch

import fserver_lib as ps
from common import passed, rank, role

ps.init()
N = 256
if role() == "worker":
    ps.barrier(True, True)  # the server registered its buffer
    for it in range(3):
        x = torch.arange(N, dtype=torch.int32) + 1000 * rank() + it
        out = torch.zeros(1, dtype=torch.int64)
        h = ps.push_pull([x], [5], [out], [6])
        ps.wait(h, 30000)
        assert int(out[0]) == int(x.sum()), (out, x.sum())
elif role() == "server":
    buf = torch.zeros(2, N, dtype=torch.int32)
    ps.register_recv_buffer(buf, [0, 1], [5, 5])
    ps.barrier(True, True)  # registered before any worker pushes
    base = buf.data_ptr()
    for it in range(3):
        batch = ps.get_batch(30000)
        for wr, (h, tensors, keys) in enumerate(batch):
            t = tensors[0]
            assert t.data_ptr() == base + wr * N * 4, (t.data_ptr(), base)
            assert torch.equal(buf[wr], torch.arange(N, dtype=torch.int32) + 1000 * wr + it)
            assert torch.equal(t, buf[wr])
            ps.respond([t.sum().reshape(1)], h)
ps.barrier(True, True)
ps.stop()
passed()
