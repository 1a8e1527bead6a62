"""A StepMesh-style AFD program, written the way StepMesh's own tests and benchmark are:
``import fserver_lib as f``, configuration only from StepMesh's launch variables, three
micro-batch stages with per-stage keys, dynamic token counts (1..128 rows of 7196 bf16),
servers answering with the pushed tensors or through respond_vec into one large return
buffer, and the benchmark's per-handle trace breakdown
``[f.fetch_trace(x) for x in f.get_all_handlers(h)]``.

Every role runs this file (the scheduler too: init() then stop()). Data is checked
exactly: token values are small integers, exact in bf16.
"""
import os

import torch

import fserver_lib as f
from common import passed

DIM = 7196
STAGES = 3
MAX_ROWS = 128
ITERS = int(os.environ.get("COMPAT_ITERS", "4"))

role = os.environ["DMLC_ROLE"]
num_workers = int(os.environ["DMLC_NUM_WORKER"])
num_servers = int(os.environ["DMLC_NUM_SERVER"])
group = int(os.environ.get("DMLC_GROUP_SIZE", "1"))
node_rank = int(os.environ.get("DMLC_NODE_RANK", "0"))
gpu = int(os.environ.get("STEPMESH_GPU", "0"))
rank = node_rank * group + gpu + int(os.environ.get("DMLC_RANK_OFFSET", "0"))


# StepMesh's benchmark key layout: private key | micro-batch << 8 | worker rank << 16,
# pull keys with bit 24 set.
def push_key(private, mb, worker):
    return private + (mb << 8) + (worker << 16)


def pull_key(private, mb, worker):
    return push_key(private, mb, worker) + (1 << 24)


def rows_for(it, mb, worker):
    # Covers both ends (1 and 128) and sizes in between, different per worker and stage.
    if it == 0:
        return 1 if mb == 0 else MAX_ROWS if mb == 1 else 64 + worker
    return (it * 37 + mb * 53 + worker * 11) % MAX_ROWS + 1


def tokens(it, mb, worker, rows):
    # Small integers (exact in bf16): row index mod 7 plus a per-(it, mb, worker) base.
    base = float((it + 3 * mb + 5 * worker) % 16)
    col = torch.arange(rows, dtype=torch.float32).remainder(7).unsqueeze(1)
    return (col + base).expand(rows, DIM).to(torch.bfloat16).contiguous()


def respond_with_pushed(it):
    # Even iterations: respond() with the pushed tensor; odd: respond_vec.
    return it % 2 == 0


f.init()

if role == "worker":
    f.barrier(True, True)
    seen_ids = set()
    for it in range(ITERS):
        handles = []
        expected = []
        # Three stages in flight at once, as an AFD pipeline keeps them.
        for mb in range(STAGES):
            rows = rows_for(it, mb, rank)
            x = tokens(it, mb, rank, rows)
            count = torch.tensor([rows], dtype=torch.int32)
            outs = [torch.zeros(rows, DIM, dtype=torch.bfloat16) for _ in range(num_servers)]
            h = f.push_pull([x, count], [push_key(0, mb, rank), push_key(1, mb, rank)],
                            outs, [pull_key(0, mb, rank)] * num_servers)
            assert isinstance(h, int)
            handles.append((h, outs))
            expected.append(x)
        for mb, (h, outs) in enumerate(handles):
            handlers = f.get_all_handlers(h)
            # StepMesh: one id per push tensor (2) and per pull slot position (1), h first.
            assert len(handlers) == 3 and handlers[0] == h, handlers
            assert len(set(handlers)) == 3
            assert not seen_ids & set(handlers), "ids are never reused"
            seen_ids.update(handlers)
            f.wait(h, 60000)
            for x in handlers[1:]:
                f.wait(x, 60000)  # every id is accepted, and already complete
            for s in range(num_servers):
                want = expected[mb] if respond_with_pushed(it) else expected[mb] * 2 + s
                assert torch.equal(outs[s], want), (it, mb, s, outs[s][:2, :4], want[:2, :4])
            # The benchmark's breakdown, per id.
            costs = [f.fetch_trace(x) for x in handlers]
            every = f.fetch_traces(h)
            assert len(every) == num_servers
            for c in costs:
                assert len(c) == 8 and all(isinstance(v, int) and v > 0 for v in c), c
                assert c in every, (c, every)
                req_send = c[1] - c[0]
                req_recv = c[3] - c[2]
                process = c[4] - c[3]
                rsp_send = c[5] - c[4]
                rsp_recv = c[7] - c[6]
                net = (c[6] - c[1]) - (c[5] - c[2])
                assert min(req_send, req_recv, process, rsp_send, rsp_recv) >= 0, c
                assert net >= 0, c  # one host: one clock
            assert costs[0][0] <= f.get_nanosecond()
    print(f"worker {rank}: {ITERS} iterations x {STAGES} stages checked", flush=True)
elif role == "server":
    # One large return buffer per stage for respond_vec, as FFN servers keep them: a
    # response is read from it after respond_vec returns (zero-copy), so a stage's buffer
    # is only rewritten once the workers have that stage's answer.
    ret_buffers = [torch.zeros(MAX_ROWS * num_workers, DIM, dtype=torch.bfloat16)
                   for _ in range(STAGES)]
    f.barrier(True, True)
    for it in range(ITERS):
        for mb in range(STAGES):
            batch = f.get_batch()
            assert len(batch) == num_workers, len(batch)
            for w, (handler, tensors, keys) in enumerate(batch):
                assert keys == [push_key(0, mb, w), push_key(1, mb, w)], (it, mb, w, keys)
                rows = rows_for(it, mb, w)
                assert tensors[0].dtype == torch.bfloat16 and tuple(tensors[0].shape) == (rows, DIM)
                assert int(tensors[1][0]) == rows
                assert torch.equal(tensors[0], tokens(it, mb, w, rows))
            if respond_with_pushed(it):
                for handler, tensors, _ in batch:
                    f.respond([tensors[0]], handler)
            else:
                ret_buffer = ret_buffers[mb]
                off = 0
                for handler, tensors, _ in batch:
                    n = tensors[0].shape[0]
                    ret_buffer[off:off + n].copy_(tensors[0] * 2 + rank)
                    off += n
                f.respond_vec(ret_buffer, [t[0] for _, t, _ in batch], [h for h, _, _ in batch])
    print(f"server {rank}: {ITERS * STAGES} batches answered", flush=True)

f.stop()
passed()
