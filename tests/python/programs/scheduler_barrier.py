"""A script that every role runs, the scheduler too, calling barrier(True, True) after
init(): the scheduler's call fails at once with FailedPreconditionError (it is in neither
group, as in ps-lite) instead of blocking until the workers and servers left and then
raising ConnectionError; the workers' and servers' barrier completes."""
import torch

import fserver_lib as ps
import meshpost
from common import passed, role

ps.init()
if role() == "scheduler":
    try:
        ps.barrier(True, True)
        raise AssertionError("a scheduler barrier returned")
    except meshpost.FailedPreconditionError as e:
        assert "scheduler" in str(e), str(e)
else:
    ps.barrier(True, True)
    if role() == "worker":
        out = torch.zeros(4)
        ps.wait(ps.push_pull([torch.ones(4)], [0], [out], [1]), 30000)
        assert torch.all(out == 2), out
    else:
        [(h, tensors, keys)] = ps.get_batch(30000)
        ps.respond([tensors[0] + 1], h)
    ps.barrier(True, True)
ps.stop()
passed()
