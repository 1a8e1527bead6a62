"""fetch_trace / fetch_traces: 8 stamps per server in pipeline order."""
import torch

import fserver_lib as ps
from common import passed, role

ps.init()
if role() == "worker":
    for _ in range(5):
        t0 = ps.get_nanosecond()
        outs = [torch.zeros(64) for _ in range(2)]
        h = ps.push_pull([torch.ones(64)], [0], outs, [1, 1])
        ps.wait(h, 30000)
        t1 = ps.get_nanosecond()
        first = ps.fetch_trace(h)
        every = ps.fetch_traces(h)
        # fetch_trace is the request to the server that answered last (critical path).
        assert len(first) == 8 and len(every) == 2 and first in every
        assert first[7] == max(tr[7] for tr in every), (first, every)
        for tr in every:
            assert all(isinstance(v, int) and v > 0 for v in tr), tr
            # Worker stamps (same host as t0/t1): start <= posted <= received <= processed.
            assert t0 <= tr[0] <= tr[1] <= tr[6] <= tr[7] <= t1, tr
            # Server stamps: received <= processed <= response start <= response posted.
            assert tr[2] <= tr[3] <= tr[4] <= tr[5], tr
            # One host here, so the clocks agree across processes too.
            assert tr[1] <= tr[2] and tr[5] <= tr[6], tr
        # StepMesh ids: 1 push tensor + 1 pull slot position, h first; each accepted.
        handlers = ps.get_all_handlers(h)
        assert len(handlers) == 2 and handlers[0] == h and len(set(handlers)) == 2
        for x in handlers:
            ps.wait(x, 0)
            assert ps.fetch_trace(x) == first
elif role() == "server":
    for _ in range(5):
        [(h, tensors, keys)] = ps.get_batch(30000)
        ps.respond([tensors[0] * 2], h)
ps.stop()
passed()
