"""In-process tests of the Python layer: options, error mapping, misuse before init."""

from __future__ import annotations

import os

import pytest
import torch

import fserver_lib as ps
import meshpost
from meshpost import _options


def test_error_classes_subclass_builtins():
    assert issubclass(meshpost.InvalidArgumentError, ValueError)
    assert issubclass(meshpost.InvalidTypeError, TypeError)
    assert issubclass(meshpost.DeadlineExceededError, TimeoutError)
    assert issubclass(meshpost.UnavailableError, ConnectionError)
    assert issubclass(meshpost.NotFoundError, ValueError)
    assert issubclass(meshpost.UnimplementedError, NotImplementedError)
    for cls in (meshpost.InvalidArgumentError, meshpost.DeadlineExceededError,
                meshpost.UnavailableError, meshpost.NotFoundError,
                meshpost.FailedPreconditionError):
        assert issubclass(cls, meshpost.Error)
    assert str(meshpost.NotFoundError("handle 3")) == "handle 3"


def test_documented_aliases_are_exported():
    # docs/python.md: DeadlineExceededError "(alias meshpost.TimeoutError)", UnavailableError
    # "(alias meshpost.ConnectionError)"; `except meshpost.TimeoutError` must not be an
    # AttributeError.
    assert meshpost.TimeoutError is meshpost.DeadlineExceededError
    assert meshpost.ConnectionError is meshpost.UnavailableError
    assert {"TimeoutError", "ConnectionError"} <= set(meshpost.__all__)


def test_timeout_seconds_are_validated_and_inf_means_no_limit():
    import math

    from meshpost.node import Handle, _ms

    assert _ms(None) == -1 and _ms(math.inf) == -1 and _ms(1e300) == -1
    assert _ms(0) == 0 and _ms(1.5) == 1500 and _ms(torch.tensor(2.0)) == 2000
    for bad in (float("nan"), -1, -math.inf):
        with pytest.raises(meshpost.InvalidArgumentError, match="timeout="):
            _ms(bad)
    for bad in ("5", True, [1]):
        with pytest.raises(meshpost.InvalidTypeError, match="timeout="):
            _ms(bad)
    # Through the public API: the check runs before the core is called.
    class Core:
        calls = []

        def wait(self, handle, timeout_ms):
            self.calls.append(timeout_ms)

    core = Core()
    with pytest.raises(meshpost.InvalidArgumentError, match="timeout=nan"):
        Handle(core, 1).wait(float("nan"))
    Handle(core, 1).wait(math.inf)
    assert core.calls == [-1]


def test_missing_environment_names_required_variables(clean_env):
    with pytest.raises(ValueError) as info:
        meshpost.Worker()
    assert isinstance(info.value, meshpost.Error)
    assert "DMLC_PS_ROOT_URI" in str(info.value)


def test_malformed_option_names_option(clean_env):
    with pytest.raises(ValueError) as info:
        meshpost.Worker(root_uri="127.0.0.1", root_port=1234, num_workers=1, num_servers=1,
                        node_rank=5)
    assert "rank" in str(info.value)


def test_unknown_keyword_is_type_error(clean_env):
    with pytest.raises(TypeError, match="unknown option"):
        meshpost.Worker(root_url="x")


def test_keywords_override_environment(clean_env):
    clean_env.setenv("DMLC_NUM_WORKER", "3")
    env = _options.build_env("worker", {"num_workers": 2, "busy_poll": True, "instance": 1})
    assert env["DMLC_NUM_WORKER"] == "2"
    assert env["MESHPOST_BUSY_POLL"] == "1"
    assert env["DMLC_ROLE"] == "worker"
    assert env["STEPMESH_GPU"] == env["DMLC_INSTANCE_ID"] == "1"


def test_rdma_without_device_is_clear_error(clean_env):
    # Forced for every pair, rdma must run at Start. (DMLC_ENABLE_RDMA only asks for it
    # between hosts, so it is judged per pair once the node table arrives.)
    if "rdma" not in meshpost.transports():
        pytest.skip("rdma is not built into this meshpost")
    if os.path.isdir("/sys/class/infiniband") and os.listdir("/sys/class/infiniband"):
        pytest.skip("this host has RDMA devices (/sys/class/infiniband), so forcing rdma works")
    with pytest.raises(meshpost.Error, match="RDMA"):
        meshpost.Worker(root_uri="127.0.0.1", root_port=1234, num_workers=1, num_servers=1,
                        transport="rdma", start_timeout_ms=5000)


def test_fserver_lib_before_init_raises():
    with pytest.raises(meshpost.FailedPreconditionError, match="init"):
        ps.push_pull([torch.ones(1)], [0], [torch.ones(1)], [0])
    with pytest.raises(RuntimeError):
        ps.wait(1)


def test_fserver_lib_signatures_match_stepmesh():
    import inspect

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    e = inspect.Parameter.empty
    assert params(ps.push_pull) == [("push_tensors", e), ("push_keys", e), ("pull_tensors", e),
                                    ("pull_keys", e), ("need_event", True)]
    assert params(ps.wait) == [("handler", e), ("timeout_ms", 10000)]
    assert params(ps.respond) == [("tensors", e), ("handler", e), ("need_event", False)]
    assert params(ps.respond_vec) == [("ret_buffer", e), ("tensors_vec", e), ("handler_vec", e)]
    assert params(ps.register_recv_buffer) == [("tensor", e), ("worker_ranks", e),
                                               ("push_keys", e)]
    assert params(ps.barrier) == [("include_server", e), ("include_worker", e),
                                  ("instance_barrier", True)]
    assert params(ps.init) == [] and params(ps.stop) == []
    assert params(ps.get_all_handlers) == [("handler", e)]
    assert params(ps.fetch_trace) == [("handler", e)]


def test_transports_and_clock():
    names = meshpost.transports()
    # The C++ transport table, highest priority first: tcp always last, no stale names.
    assert names[-1] == "tcp"
    assert len(set(names)) == len(names)
    assert set(names) <= {"cma", "rdma", "tcp"}, names
    a = ps.get_nanosecond()
    b = meshpost.get_nanosecond()
    assert isinstance(a, int) and b >= a > 0
    assert "bfloat16" in meshpost.supported_dtypes()


def test_empty_is_an_ordinary_tensor_in_shared_memory():
    import fserver_lib
    t = meshpost.empty((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert meshpost.is_shared(t) and meshpost.is_shared(t[1])
    t.fill_(2.5)
    assert float(t.sum()) == 2.5 * 15
    assert t.data_ptr() % (2 << 20) == 0  # huge-page aligned block start
    u = fserver_lib.empty(7, torch.int64)
    assert u.shape == (7,) and meshpost.is_shared(u)
    z = meshpost.empty((0, 4))
    assert z.numel() == 0 and z.dtype == torch.float32
    assert not meshpost.is_shared(torch.zeros(3))
    del t, u  # frees the blocks


def test_empty_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        meshpost.empty((2, -1))
    with pytest.raises(TypeError, match="dtype"):
        meshpost.empty((2,), "float32")
    with pytest.raises(TypeError, match="shape"):
        meshpost.empty("abc")
