"""Server 1 SIGKILLs itself after get_batch; the worker's wait must raise ConnectionError
(within the heartbeat timeout) instead of hanging, and later push_pulls fail fast."""
import os
import signal

import torch

import fserver_lib as ps
import meshpost
from common import passed, rank, role

ps.init()
if role() == "worker":
    outs = [torch.zeros(4), torch.zeros(4)]
    h = ps.push_pull([torch.ones(4)], [0], outs, [1, 1])
    try:
        ps.wait(h, 20000)
        raise AssertionError("wait succeeded although server 1 died")
    except ConnectionError as e:
        assert isinstance(e, meshpost.UnavailableError), type(e)
        print(f"wait failed as expected: {e}", flush=True)
    try:
        h2 = ps.push_pull([torch.ones(4)], [0], outs, [1, 1])
        ps.wait(h2, 20000)
        raise AssertionError("push_pull to a dead server succeeded")
    except ConnectionError:
        pass
    passed()
    ps.stop()
elif role() == "server":
    [(h, tensors, keys)] = ps.get_batch(30000)
    if rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    ps.respond([tensors[0]], h)
    passed()
    ps.stop()
