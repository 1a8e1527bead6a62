"""A "forever" timeout waits: fserver_lib.wait(h, sys.maxsize) used to time out at once
(the deadline wrapped around into the past). The server answers only after a barrier that the worker enters while a
helper thread waits, so the wait starts while the request is pending."""
import sys
import threading

import torch

import fserver_lib as ps
from common import passed, role

ps.init()
if role() == "worker":
    for rnd, forever in enumerate((sys.maxsize, 2**62)):
        out = torch.zeros(4)
        h = ps.push_pull([torch.full((4,), float(rnd))], [0], [out], [1])
        errors = []

        def waiter(h=h, forever=forever, errors=errors):
            try:
                ps.wait(h, forever)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        t.join(2.0)  # the server is held in the barrier: nothing can complete the wait
        ps.barrier(True, True)  # releases the server's answer
        t.join(60.0)
        assert not t.is_alive(), "wait did not return after the server answered"
        assert not errors, f"wait(handler, {forever}) failed: {errors[0]!r}"
        assert torch.all(out == rnd + 1), out
elif role() == "server":
    for rnd in range(2):
        [(h, tensors, keys)] = ps.get_batch(60000)
        ps.barrier(True, True)
        ps.respond([tensors[0] + 1], h)
ps.stop()
passed()
