"""2 workers x 2 servers, 2 pull slots per server: every slot must hold the value of the
server and slot it is routed to, computed from the right worker's push; get_batch returns
one request per worker in worker-rank order."""
import os

import torch

import meshpost
from common import passed, rank, role

ITERS = 20
if role() == "worker":
    with meshpost.Worker() as w:
        assert w.num_servers == 2 and w.num_workers == 2
        assert set(w.transports()) == {"server 0", "server 1"}
        # Same host: the same-host van when it is built and nothing is forced; a forced
        # transport (tcp, or rdma in the soft-RoCE VM stage) for every pair.
        forced = os.environ.get("MESHPOST_TRANSPORT", "auto")
        if forced in ("tcp", "rdma"):
            want = forced
        else:
            want = "tcp" if "cma" not in meshpost.transports() else "cma"
        try:  # Yama ptrace_scope >= 1 refuses cross-memory attach between siblings
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                if want == "cma" and f.read().strip() != "0":
                    want = "cma-shm"
        except OSError:
            pass
        assert set(w.transports().values()) == {want}, w.transports()
        for it in range(ITERS):
            push = torch.full((4, 3), float(100 * rank() + it))
            tag = torch.tensor([rank()], dtype=torch.int64)
            pull = [torch.zeros(4, 3) for _ in range(4)]
            h = w.push_pull([push, tag], [1, 2], pull, [10, 11, 10, 11])
            h.wait(timeout=30)
            assert h.done()
            for s in range(2):
                for j in range(2):
                    want = 100 * rank() + it + 1000 * s + 10 * j
                    assert torch.all(pull[s * 2 + j] == want), (it, s, j, pull[s * 2 + j])
            # StepMesh ids: 2 push tensors + 2 pull slot positions, this handle first.
            assert h.handlers() == [h.id + i for i in range(4)]
elif role() == "server":
    with meshpost.Server() as s:
        for it in range(ITERS):
            batch = s.get_batch(timeout=30)
            assert [r.worker_rank for r in batch] == [0, 1]
            for wr, req in enumerate(batch):
                assert req.keys == [1, 2]
                push, tag = req.tensors
                assert tag.dtype == torch.int64 and int(tag[0]) == wr  # rank order
                assert torch.all(push == 100 * wr + it)
                slots = req.pull_slots()
                assert [k for k, *_ in slots] == [10, 11]
                req.respond([push + 1000 * s.rank, push + 1000 * s.rank + 10])
passed()
