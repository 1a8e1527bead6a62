"""A cluster program for tests/hosts, run by `meshpost.launch` on every "host".

Every process prints one line "HOST {json}" (its name, hostname and per-peer transports)
for the test to check, then exchanges ITERS rounds of 64 KiB tensors: each worker pushes
a value derived from its rank and round to every server, each server answers with that
value plus 1000 * its rank, and both sides assert every element. Then:
  data: leave (workers and servers print "PASS <name>").
  kill: print "READY <name>", then workers post one more push_pull that the servers never
        answer, and wait up to 300 s; the test cuts one host's link meanwhile, and a worker
        on the surviving host must see ConnectionError naming a server on the cut host.
        It prints "PEER_ERROR <wall time> <exception type> <message>".
"""
import json
import os
import socket
import sys
import time

import torch

import meshpost

ITERS = 10
mode = sys.argv[1] if len(sys.argv) > 1 else "data"
role = os.environ["DMLC_ROLE"]


def say(*parts):
    print(*parts, flush=True)


def report(node, name):
    say("HOST", json.dumps({"name": name, "hostname": socket.gethostname(),
                            "transports": node.transports()}, sort_keys=True))


if role == "worker":
    with meshpost.Worker() as w:
        name = f"worker:{w.rank}"
        report(w, name)
        n = w.num_servers
        for it in range(ITERS):
            push = torch.full((128, 128), float(100 * w.rank + it))
            tag = torch.tensor([w.rank], dtype=torch.int64)
            pull = [torch.zeros(128, 128) for _ in range(n)]
            h = w.push_pull([push, tag], [1, 2], pull, [10] * n)
            h.wait(timeout=60)
            for s in range(n):
                want = 100 * w.rank + it + 1000 * s
                assert torch.all(pull[s] == want), (name, it, s, pull[s][0, :4])
        if mode == "data":
            say(f"PASS {name}")
        else:
            say(f"READY {name}")
            pull = [torch.zeros(128, 128) for _ in range(n)]
            h = w.push_pull([torch.ones(128, 128), torch.tensor([w.rank])], [1, 2], pull,
                            [10] * n)
            try:
                h.wait(timeout=300)
                say(f"UNEXPECTED {name} the unanswered push_pull completed")
            except Exception as e:  # noqa: BLE001 - the test asserts the type
                say(f"PEER_ERROR {time.time():.3f} {type(e).__name__} "
                    f"{isinstance(e, ConnectionError)} {e}")
            sys.stdout.flush()
            os._exit(0)  # peers are gone: leave without the orderly shutdown
elif role == "server":
    with meshpost.Server() as s:
        name = f"server:{s.rank}"
        report(s, name)
        for it in range(ITERS):
            batch = s.get_batch(timeout=60)
            assert [r.worker_rank for r in batch] == list(range(s.num_workers)), batch
            for wr, req in enumerate(batch):
                push, tag = req.tensors
                assert int(tag[0]) == wr and torch.all(push == 100 * wr + it), (name, it, wr)
                req.respond([push + 1000 * s.rank])
        if mode == "data":
            say(f"PASS {name}")
        else:
            say(f"READY {name}")
            try:
                s.get_batch(timeout=300)  # the last round: deliberately left unanswered
                s.get_batch(timeout=300)  # never complete: every worker waits on us
            except Exception as e:  # noqa: BLE001
                say(f"SERVER_ERROR {type(e).__name__} {e}")
            sys.stdout.flush()
            os._exit(0)
