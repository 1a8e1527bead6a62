"""respond_vec with two workers sending different row counts: worker i gets rows
[off_i, off_i + rows_i) of the server's return buffer."""
import torch

import fserver_lib as ps
from common import passed, rank, role

ps.init()
ROWS = {0: 3, 1: 5}
if role() == "worker":
    r = ROWS[rank()]
    x = torch.full((r, 4), float(rank()))
    out = torch.zeros(r, 4)
    h = ps.push_pull([x], [0], [out], [1])
    ps.wait(h, 30000)
    off = 0 if rank() == 0 else ROWS[0]
    want = torch.arange(off, off + r, dtype=torch.float32).unsqueeze(1).expand(r, 4)
    assert torch.equal(out, want), (out, want)
elif role() == "server":
    batch = ps.get_batch(30000)
    assert [t[0].shape[0] for _, t, _ in batch] == [3, 5]
    total = sum(t[0].shape[0] for _, t, _ in batch)
    ret = torch.arange(total, dtype=torch.float32).unsqueeze(1).expand(total, 4).contiguous()
    ps.respond_vec(ret, [t[0] for _, t, _ in batch], [h for h, _, _ in batch])
ps.barrier(True, True)
ps.stop()
passed()
