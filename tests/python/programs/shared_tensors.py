"""meshpost.empty tensors end to end (2 workers x 2 servers): pushes from shared memory,
pull slots in shared memory answered through Request.outputs (respond() with nothing,
with the outputs, or with a computed tensor), a last round from ordinary tensors, and
views of a worker's memory surviving the worker freeing it. Same answers on every
transport; on the same-host van the outputs are the worker's own slots."""
import os

import torch

import fserver_lib
import meshpost
from common import passed, rank, role

ITERS = 12
ROWS, COLS = 128, 64


def expected(wr: int, it: int, server: int) -> torch.Tensor:
    base = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) % 251
    return ((base + wr + it).to(torch.bfloat16).float() + 1000 * server).to(torch.bfloat16).float()


if role() == "worker":
    with meshpost.Worker() as w:
        push = meshpost.empty((ROWS, COLS), torch.float32)
        meta = fserver_lib.empty(4, torch.int32)
        pulls = [meshpost.empty((ROWS, COLS), torch.bfloat16) for _ in range(2)]
        assert meshpost.is_shared(push) and meshpost.is_shared(meta)
        assert push.is_contiguous() and push.dtype == torch.float32 and meta.shape == (4,)
        assert not meshpost.is_shared(torch.zeros(4))
        for it in range(ITERS + 1):
            if it == ITERS:
                # Free every shared block (a server still holds views of the last push)
                # and finish with ordinary tensors.
                push, meta, pulls = push.clone(), meta.clone(), [torch.zeros(ROWS, COLS, dtype=torch.bfloat16) for _ in range(2)]
            base = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) % 251
            push.copy_(base + rank() + it)
            meta.copy_(torch.tensor([rank(), it, 0, 0], dtype=torch.int32))
            for p in pulls:
                p.zero_()
            # need_event applies to CUDA tensors only: with CPU tensors it changes nothing.
            h = w.push_pull([push, meta], [1, 2], pulls, [10, 10], need_event=it % 2 == 0)
            h.wait(timeout=30)
            for s in range(2):
                got = pulls[s].float()
                want = expected(rank(), it, s)
                assert torch.equal(got, want), (it, s, (got - want).abs().max())
elif role() == "server":
    with meshpost.Server() as s:
        same_host = set(s.transports().values()) <= {"cma", "cma-shm"}
        held = None
        for it in range(ITERS + 1):
            batch = s.get_batch(timeout=30)
            for wr, req in enumerate(batch):
                push, meta = req.tensors
                assert meta.tolist()[:2] == [wr, it], meta
                base = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) % 251
                assert torch.equal(push, base + wr + it)
                outs = req.outputs
                assert len(outs) == 1 and outs[0].shape == (ROWS, COLS)
                assert outs[0].dtype == torch.bfloat16
                answer = (push.to(torch.bfloat16).float() + 1000 * s.rank).to(torch.bfloat16)
                mode = it % 3
                if mode == 0:
                    outs[0].copy_(answer)
                    req.respond()  # the outputs: in place on the same host
                elif mode == 1:
                    outs[0].copy_(answer)
                    req.respond(outs, need_event=True)
                else:
                    req.respond([answer])  # one memcpy into the worker's slot
                # Views of the worker's slot end at respond (fresh tensors elsewhere stay).
                assert outs[0].numel() == (0 if same_host and it < ITERS else ROWS * COLS)
            if it == ITERS - 1:
                held = batch
        # The workers freed the memory behind these views; reading them must not fault.
        for req in held:
            float(req.tensors[0][0, 0])
        print("same_host", same_host, flush=True)
passed()
