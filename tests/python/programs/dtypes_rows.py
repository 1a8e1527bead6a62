"""bf16 and int32 payloads; the row count of a reused key changes every iteration."""
import torch

import fserver_lib as ps
from common import passed, role

ROWS = [1, 128, 7, 64, 3, 128, 0, 33]
ps.init()
if role() == "worker":
    for i, rows in enumerate(ROWS):
        x = (torch.arange(rows * 16, dtype=torch.float32).reshape(rows, 16) / 8 + i).to(torch.bfloat16)
        route = torch.arange(rows * 2, dtype=torch.int32).reshape(rows, 2) + i
        out = torch.zeros(rows, 16, dtype=torch.bfloat16)
        out_route = torch.zeros(rows, 2, dtype=torch.int32)
        h = ps.push_pull([x, route], [0, 1], [out, out_route], [2, 3])
        ps.wait(h, 30000)
        assert torch.equal(out, x * 2), (i, out, x)
        assert torch.equal(out_route, route * 3)
elif role() == "server":
    for i, rows in enumerate(ROWS):
        [(h, tensors, keys)] = ps.get_batch(30000)
        x, route = tensors
        assert keys == [0, 1]
        assert x.dtype == torch.bfloat16 and tuple(x.shape) == (rows, 16)
        assert route.dtype == torch.int32 and tuple(route.shape) == (rows, 2)
        ps.respond([x * 2, route * 3], h)
ps.stop()
passed()
