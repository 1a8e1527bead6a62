"""Only the server caps frames at 64 KiB (MESHPOST_MAX_MESSAGE_BYTES), over tcp with a
cluster token: the worker's 256 KiB push goes out, the server closes that connection, and
the worker's van authenticates a new one, so the pair keeps working. It used to stay
broken: every later message on the pair was dropped as unauthenticated and timed out.
The oversized push itself is lost (the sender does not know the receiver's cap): its
handle ends with a timeout, not a result."""
import torch

import fserver_lib as ps
import meshpost
from common import passed, role

BIG = 65536  # float32 elements: 256 KiB


def roundtrip(i):
    out = torch.zeros(4)
    h = ps.push_pull([torch.full((4,), float(i))], [1], [out], [1])
    ps.wait(h, 30000)
    assert torch.all(out == i + 1), out


ps.init()
if role() == "worker":
    roundtrip(1)
    h = ps.push_pull([torch.ones(BIG)], [0], [torch.zeros(4)], [1])
    try:
        ps.wait(h, 3000)
        raise AssertionError("a push over the server's frame cap completed")
    except meshpost.Error as e:
        assert isinstance(e, meshpost.DeadlineExceededError), repr(e)
    for i in (2, 3, 4):
        roundtrip(i)
    ps.barrier(True, True)
elif role() == "server":
    for i in (1, 2, 3, 4):
        [(h, tensors, keys)] = ps.get_batch(30000)
        assert list(keys) == [1], keys  # the oversized push (key 0) never arrives
        ps.respond([tensors[0] + 1], h)
    ps.barrier(True, True)
ps.stop()
passed()
