"""Ctrl-C during wait(): the server sends SIGINT to the waiting worker (pid in the push),
the worker's wait raises KeyboardInterrupt, and the handle can still be waited on.

SIGINT can only interrupt a wait the worker is in, so the worker ignores it outside its
wait and the server repeats it (every 100 ms) until the worker's second request says the
interrupt was seen: no timing assumption about when the worker enters wait()."""
import os
import signal

import torch

import fserver_lib as ps
from common import passed, role

ps.init()
if role() == "worker":
    in_wait = False

    def on_sigint(signum, frame):
        if in_wait:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    out = torch.zeros(1, dtype=torch.int64)
    h = ps.push_pull([torch.tensor([os.getpid()], dtype=torch.int64)], [0], [out], [1])
    interrupted = False
    try:
        in_wait = True
        ps.wait(h, 60000)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        in_wait = False
    assert interrupted
    ack = torch.zeros(1, dtype=torch.int64)
    h2 = ps.push_pull([torch.tensor([1], dtype=torch.int64)], [2], [ack], [3])
    ps.wait(h, 30000)  # the interrupted handle still completes
    ps.wait(h2, 30000)
    assert int(out[0]) == os.getpid() + 1
    assert int(ack[0]) == 2
elif role() == "server":
    [(h, tensors, keys)] = ps.get_batch(30000)
    pid = int(tensors[0][0])
    answer = tensors[0] + 1
    while True:
        os.kill(pid, signal.SIGINT)
        try:
            [(h2, tensors2, keys2)] = ps.get_batch(100)
            break
        except TimeoutError:
            continue
    ps.respond([answer], h)
    ps.respond([tensors2[0] + 1], h2)
ps.stop()
passed()
