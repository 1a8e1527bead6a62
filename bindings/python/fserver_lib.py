"""fserver_lib: StepMesh's Python API, served by meshpost.

Code written as ``import fserver_lib as ps`` for StepMesh runs unchanged: same function
names, signatures and defaults, configuration from the DMLC_* variables. Differences
that keep compatibility:

* errors raise exceptions (subclasses of meshpost.Error and of ValueError, TypeError,
  TimeoutError or ConnectionError) instead of aborting the process;
* ``get_batch(timeout_ms=None)`` accepts an optional timeout;
* ``push_pull`` allocates StepMesh's ids (one per push tensor and per pull slot position,
  the handler first); ``get_all_handlers``, ``wait`` and ``fetch_trace`` accept each of
  them. ``fetch_trace(x)`` gives the 8 stamps of the request that carried x's tensors (the
  server that answered last); ``fetch_traces(handler)`` gives every server's;
* ``need_event`` is accepted and ignored (CPU tensors need no CUDA event).

Tensors returned by ``get_batch`` view the received bytes without a copy and stay valid
for as long as they are referenced (see docs/python.md for the registered-buffer case).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


from meshpost import _meshpost
from meshpost.errors import FailedPreconditionError, InvalidArgumentError
from meshpost._options import build_env
from meshpost.node import track

__all__ = [
    "init", "stop", "push_pull", "wait", "get_batch", "respond", "respond_vec",
    "register_recv_buffer", "barrier", "get_all_handlers", "fetch_trace", "fetch_traces",
    "get_nanosecond",
]

_node: Optional["_meshpost.Node"] = None


def _require() -> "_meshpost.Node":
    if _node is None:
        raise FailedPreconditionError("fserver_lib: call init() first")
    return _node


def init() -> None:
    """Joins the cluster described by the DMLC_* variables (all roles, scheduler too)."""
    global _node
    if _node is not None:
        raise FailedPreconditionError("fserver_lib.init: already initialised; call stop() first")
    node = track(_meshpost.Node(build_env(None, {})))
    node.start()
    _node = node


def stop() -> None:
    """Leaves the cluster. The scheduler waits until every worker and server left."""
    global _node
    node = _require()
    _node = None
    node.stop(-1)
    node.close(0)


def push_pull(push_tensors: Sequence[torch.Tensor], push_keys: Sequence[int],
              pull_tensors: Sequence[torch.Tensor], pull_keys: Sequence[int],
              need_event: bool = True) -> int:
    """Pushes to every server and pulls into pull_tensors (server-major); returns a handler."""
    return _require().push_pull(push_tensors, push_keys, pull_tensors, pull_keys)


def wait(handler: int, timeout_ms: int = 10000) -> None:
    """Blocks until `handler` completed; TimeoutError after timeout_ms."""
    _require().wait(handler, timeout_ms)


def get_batch(timeout_ms: Optional[int] = None) -> List[Tuple[int, List[torch.Tensor], List[int]]]:
    """One (handler, [tensors], [keys]) per worker, in worker-rank order."""
    batch = _require().get_batch(-1 if timeout_ms is None else timeout_ms)
    return [(handle, tensors, keys) for handle, _rank, tensors, keys in batch]


def respond(tensors: Sequence[torch.Tensor], handler: int, need_event: bool = False) -> None:
    """Answers `handler` into the worker's pull slots (sizes and dtypes must match)."""
    _require().respond(tensors, handler)


def respond_vec(ret_buffer: torch.Tensor, tensors_vec: Sequence[torch.Tensor],
                handler_vec: Sequence[int]) -> None:
    """handler_vec[i] gets rows [off_i, off_i + tensors_vec[i].shape[0]) of ret_buffer."""
    _require().respond_vec(ret_buffer, tensors_vec, handler_vec)


def register_recv_buffer(tensor: torch.Tensor, worker_ranks: Sequence[int],
                         push_keys: Sequence[int]) -> None:
    """Pushes of push_keys[i] from worker_ranks[i] land in chunk i of `tensor`."""
    _require().register_recv_buffer(tensor, worker_ranks, push_keys)


def barrier(include_server: bool, include_worker: bool, instance_barrier: bool = True) -> None:
    """Blocks until every live member of the chosen groups arrived.

    meshpost has one barrier domain per group set, so instance_barrier is accepted for
    compatibility and has no further effect.
    """
    node = _require()
    mask = (_meshpost.SERVER_GROUP if include_server else 0) | (
        _meshpost.WORKER_GROUP if include_worker else 0)
    if mask == 0:
        raise InvalidArgumentError(
            "barrier: include_server=False and include_worker=False; expected at least one group")
    if node.role == "scheduler":
        mask |= _meshpost.SCHEDULER_GROUP
    node.barrier(mask, -1)


def get_all_handlers(handler: int) -> List[int]:
    """The ids of `handler`'s batch, `handler` first: one per push tensor and one per pull
    slot position (StepMesh's numbering). Each is accepted by wait() and fetch_trace()."""
    return list(_require().get_all_handlers(handler))


def fetch_trace(handler: int) -> List[int]:
    """The 8 stamps (get_nanosecond() clock) of the request that carried `handler`'s
    tensors: request start, posted, received, processed; response start, posted,
    received, processed. `handler` may be any id from get_all_handlers(); the request is
    the one to the server that answered last (the batch's critical path)."""
    return list(_require().fetch_trace(handler))


def fetch_traces(handler: int) -> List[List[int]]:
    """The 8 trace stamps of `handler`'s request to every server, in server-rank order."""
    return [list(t) for t in _require().fetch_traces(handler)]


def get_nanosecond() -> int:
    """Monotonic nanoseconds on the trace clock."""
    return _meshpost.get_nanosecond()
