"""A tensor larger than MESHPOST_MAX_MESSAGE_BYTES (run over tcp with a 64 KiB cap) fails
its handle or respond() with an error naming the variable, and the pair keeps working.
It used to go out anyway: the receiver closed the connection, the handle timed out, and
every later message on that pair was lost."""
import torch

import fserver_lib as ps
import meshpost
from common import passed, role

CAP = 65536
BIG = CAP // 4 + 1  # float32 elements: one tensor of CAP + 4 bytes


def roundtrip(i):
    out = torch.zeros(4)
    h = ps.push_pull([torch.full((4,), float(i))], [0], [out], [1])
    ps.wait(h, 30000)
    assert torch.all(out == i + 1), out


ps.init()
if role() == "worker":
    h = ps.push_pull([torch.ones(BIG)], [0], [torch.zeros(4)], [1])
    try:
        ps.wait(h, 30000)
        raise AssertionError("a push over the frame cap completed")
    except ValueError as e:
        assert isinstance(e, meshpost.InvalidArgumentError), repr(e)
        assert "MESHPOST_MAX_MESSAGE_BYTES" in str(e) and str(CAP + 4) in str(e), str(e)
    roundtrip(1)
    # The server cannot answer a pull slot over the cap; it refuses, then the pair works.
    big_out = torch.zeros(BIG)
    h = ps.push_pull([torch.ones(4)], [0], [big_out], [1])
    ps.barrier(True, True)  # the server's respond was refused
    roundtrip(2)
elif role() == "server":
    for i in (1, 0, 2):  # round 0 is the pull the server cannot answer
        [(h, tensors, keys)] = ps.get_batch(30000)
        if i == 0:
            try:
                ps.respond([torch.ones(BIG)], h)
                raise AssertionError("a response over the frame cap was sent")
            except ValueError as e:
                assert "MESHPOST_MAX_MESSAGE_BYTES" in str(e), str(e)
            ps.barrier(True, True)
        else:
            ps.respond([tensors[0] + 1], h)
ps.stop()
passed()
