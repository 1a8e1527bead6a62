"""Bad inputs raise clear exceptions (meshpost.Error plus the fitting builtin) and the
process keeps working: a correct round trip follows every failure."""
import torch

import fserver_lib as ps
import meshpost
from common import passed, role


def expect(exc, fn, *args, contains=""):
    try:
        fn(*args)
    except exc as e:
        assert isinstance(e, meshpost.Error), type(e)
        assert contains in str(e), (contains, str(e))
        return
    raise AssertionError(f"{fn.__name__}{args!r} did not raise {exc.__name__}")


def roundtrip(i):
    out = torch.zeros(4)
    h = ps.push_pull([torch.full((4,), float(i))], [0], [out], [1])
    ps.wait(h, 30000)
    assert torch.all(out == i + 1), out


ROUNDS = 3
ps.init()
if role() == "worker":
    x, out = torch.ones(4), torch.zeros(4)
    expect(ValueError, ps.push_pull, [torch.ones(4, 4).t()], [0], [out], [1], contains="contiguous")
    expect(TypeError, ps.push_pull, [torch.ones(4, dtype=torch.complex64)], [0], [out], [1],
           contains="complex")
    expect(ValueError, ps.push_pull, [x, x], [0], [out], [1], contains="push_keys")
    expect(ValueError, ps.push_pull, [x], [0], [out], [1, 2], contains="pull_keys")
    expect(ValueError, ps.push_pull, [torch.ones(4, device="meta")], [0], [out], [1],
           contains="device")
    expect(TypeError, ps.push_pull, [[1, 2]], [0], [out], [1], contains="torch.Tensor")
    expect(TypeError, ps.push_pull, x, [0], [out], [1], contains="list")
    expect(TypeError, ps.push_pull, [x], ["a"], [out], [1], contains="int")
    # Negative keys: the message names the Python argument and the value.
    expect(ValueError, ps.push_pull, [x], [-1], [out], [1], contains="push_pull: push_keys[0]=-1")
    expect(ValueError, ps.push_pull, [x], [0], [out], [-5], contains="push_pull: pull_keys[0]=-5")
    expect(ValueError, ps.wait, 987654321, 1000)  # unknown handler
    expect(ValueError, ps.wait, -1, 1000)
    expect(ValueError, ps.get_all_handlers, 987654321)
    expect(meshpost.FailedPreconditionError, ps.get_batch, 10)  # wrong role
    roundtrip(0)
    # The server refuses a wrong-size and a wrong-dtype response to round 1, then answers.
    roundtrip(1)
    roundtrip(2)
elif role() == "server":
    for i in range(ROUNDS):
        [(h, tensors, keys)] = ps.get_batch(30000)
        if i == 1:
            expect(ValueError, ps.respond, [torch.zeros(5)], h, contains="expects")
            expect(ValueError, ps.respond, [torch.zeros(4, dtype=torch.float64)], h,
                   contains="expects")
            expect(ValueError, ps.respond, [torch.zeros(4), torch.zeros(4)], h)
            expect(ValueError, ps.respond, [torch.zeros(4)], h + 1000)
            expect(ValueError, ps.respond_vec, torch.zeros(4), [torch.zeros(4)], [h, h])
            expect(ValueError, ps.register_recv_buffer, torch.zeros(3), [0, 1], [0, 1])
            expect(ValueError, ps.register_recv_buffer, torch.zeros(4), [0], [-2],
                   contains="register_recv_buffer: push_keys[0]=-2")
        ps.respond([tensors[0] + 1], h)
    expect(ValueError, ps.respond, [torch.zeros(4)], h, contains="already answered")
    expect(meshpost.FailedPreconditionError, ps.push_pull, [torch.ones(1)], [0], [], [])
ps.stop()
passed()
