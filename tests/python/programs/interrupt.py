"""Ctrl-C during wait(): the server sends SIGINT to the waiting worker (pid in the push),
the worker's wait raises KeyboardInterrupt, and the handle can still be waited on."""
import os
import signal

import torch

import fserver_lib as ps
from common import passed, role

ps.init()
if role() == "worker":
    out = torch.zeros(1, dtype=torch.int64)
    h = ps.push_pull([torch.tensor([os.getpid()], dtype=torch.int64)], [0], [out], [1])
    interrupted = False
    try:
        ps.wait(h, 60000)
    except KeyboardInterrupt:
        interrupted = True
    assert interrupted
    ps.barrier(True, True)
    ps.wait(h, 30000)
    assert int(out[0]) == os.getpid() + 1
elif role() == "server":
    [(h, tensors, keys)] = ps.get_batch(30000)
    os.kill(int(tensors[0][0]), signal.SIGINT)
    ps.barrier(True, True)
    ps.respond([tensors[0] + 1], h)
ps.stop()
passed()
