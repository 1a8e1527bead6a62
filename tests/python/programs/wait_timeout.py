"""wait() raises TimeoutError within a second of its limit; the request stays pending and
completes once the server answers (after a barrier, so no sleeps). get_batch(timeout_ms)
raises TimeoutError when no worker sends."""
import time

import torch

import fserver_lib as ps
import meshpost
from common import passed, role

LIMIT_MS = 700
ps.init()
if role() == "worker":
    out = torch.zeros(8)
    h = ps.push_pull([torch.ones(8)], [0], [out], [1])
    t0 = time.monotonic()
    try:
        ps.wait(h, LIMIT_MS)
        raise AssertionError("wait returned before the server answered")
    except TimeoutError as e:
        elapsed = time.monotonic() - t0
        assert isinstance(e, meshpost.DeadlineExceededError)
        assert LIMIT_MS / 1000 <= elapsed + 0.005 and elapsed < LIMIT_MS / 1000 + 1.0, elapsed
        assert "timeout_ms=700" in str(e), str(e)
    ps.barrier(True, True)  # releases the server
    ps.wait(h, 30000)
    assert torch.all(out == 3)
    ps.barrier(True, True)  # sends nothing until the server's get_batch timed out
elif role() == "server":
    [(h, tensors, keys)] = ps.get_batch(30000)
    ps.barrier(True, True)  # the worker's wait has timed out
    ps.respond([tensors[0] * 3], h)
    t0 = time.monotonic()
    try:
        ps.get_batch(300)
        raise AssertionError("get_batch returned without a request")
    except TimeoutError as e:
        assert time.monotonic() - t0 < 1.3
        # Names the caller's limit and what is missing, not the last internal wait slice.
        assert "timeout_ms=300; waiting for worker(s) 0" in str(e), str(e)
    ps.barrier(True, True)
ps.stop()
passed()
