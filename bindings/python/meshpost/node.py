"""The pythonic face of meshpost: Worker, Server and Scheduler objects.

    with meshpost.Worker(num_workers=2, num_servers=2) as w:
        h = w.push_pull([tokens], [0], outs, [100] * len(outs))
        h.wait(timeout=5.0)

Options are keyword arguments that fall back to the DMLC_* / MESHPOST_* environment
variables (see meshpost._options.OPTION_VARIABLES). Times are seconds (float) here;
the StepMesh-compatible fserver_lib module keeps StepMesh's milliseconds.
"""

from __future__ import annotations

import atexit
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from . import _meshpost
from ._options import build_env
from .errors import InvalidArgumentError

__all__ = ["Node", "Worker", "Server", "Scheduler", "Handle", "Request", "Trace"]

_live_nodes: "weakref.WeakSet[_meshpost.Node]" = weakref.WeakSet()
_live_lock = threading.Lock()


def _close_all_at_exit() -> None:
    # Leave the cluster before the interpreter tears down: peers are told at once instead
    # of waiting for a heartbeat timeout, and no van thread outlives Python.
    with _live_lock:
        nodes = list(_live_nodes)
    for node in nodes:
        try:
            node.close(1000)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_close_all_at_exit)


def track(node: "_meshpost.Node") -> "_meshpost.Node":
    """Registers a core node for closing at interpreter exit (used by fserver_lib too)."""
    with _live_lock:
        _live_nodes.add(node)
    return node


def _ms(timeout: Optional[float]) -> int:
    """Seconds (None or math.inf: no limit) -> the core's milliseconds (-1: no limit)."""
    from .errors import InvalidArgumentError, InvalidTypeError

    if timeout is None:
        return -1
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        bad = isinstance(timeout, (bool, str, bytes))
        try:
            if not bad:
                timeout = float(timeout)  # numpy / torch scalars, Fraction, Decimal
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise InvalidTypeError(f"timeout={timeout!r} is a {type(timeout).__name__}; "
                                   f"expected seconds (int or float) or None")
    if math.isnan(timeout) or timeout < 0:
        raise InvalidArgumentError(f"timeout={timeout!r}; expected seconds >= 0 or None")
    if math.isinf(timeout) or timeout * 1000 >= 2**63 - 1:
        return -1
    return int(round(timeout * 1000))


class Trace(NamedTuple):
    """Eight nanosecond stamps of one request to one server (see docs/python.md)."""

    request_start: int
    request_posted: int
    request_received: int
    request_processed: int
    response_start: int
    response_posted: int
    response_received: int
    response_processed: int


class Node:
    """A started cluster member. Use a subclass: Worker, Server or Scheduler."""

    role: str = ""

    def __init__(self, **options: Any) -> None:
        self._node = track(_meshpost.Node(build_env(self.role, options)))
        self._node.start()

    # --- lifecycle ---
    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Leaves the cluster and frees the node. Idempotent."""
        self._node.close(_ms(timeout))

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- info ---
    @property
    def rank(self) -> int:
        """Worker or server rank (0 for the scheduler)."""
        return self._node.rank

    @property
    def num_workers(self) -> int:
        return self._node.num_workers

    @property
    def num_servers(self) -> int:
        return self._node.num_servers

    @property
    def port(self) -> int:
        """The port this node listens on."""
        return self._node.port

    def transports(self) -> Dict[str, str]:
        """Transport used for each peer, e.g. {"server 0": "tcp", "server 1": "tcp"}."""
        return dict(self._node.transports())

    def barrier(self, servers: bool = True, workers: bool = True,
                timeout: Optional[float] = None) -> None:
        """Blocks until every live member of the chosen groups arrived."""
        mask = (_meshpost.SERVER_GROUP if servers else 0) | (
            _meshpost.WORKER_GROUP if workers else 0)
        if self.role == "scheduler":
            from .errors import FailedPreconditionError

            # Workers and servers barrier among themselves; a scheduler barrier could
            # never be joined and would block until they left.
            raise FailedPreconditionError(
                "barrier: called on the scheduler, which is not a member of the server or "
                "worker group; expected only workers and servers to call barrier")
        self._node.barrier(mask, _ms(timeout))

    def __repr__(self) -> str:
        return f"<meshpost.{type(self).__name__} rank={self._node.rank}>"


class Handle:
    """One push_pull in flight. Completes once every server answered."""

    __slots__ = ("_node", "id")

    def __init__(self, node: "_meshpost.Node", handle_id: int) -> None:
        self._node = node
        self.id = handle_id

    def wait(self, timeout: Optional[float] = 30.0) -> None:
        """Blocks until done. TimeoutError (meshpost.DeadlineExceededError) after `timeout`
        seconds, leaving the request pending; ConnectionError if a server died."""
        self._node.wait(self.id, _ms(timeout))

    def done(self) -> bool:
        """True once the request completed, successfully or not."""
        return self._node.done(self.id)

    def handlers(self) -> List[int]:
        """StepMesh's ids of this batch, this handle first: one per push tensor and one
        per pull slot position. Each is accepted by fserver_lib.wait/fetch_trace."""
        return list(self._node.get_all_handlers(self.id))

    def traces(self) -> List[Trace]:
        """One Trace per server, in server-rank order."""
        return [Trace(*t) for t in self._node.fetch_traces(self.id)]

    def __int__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return f"<meshpost.Handle {self.id}>"


class Worker(Node):
    """An attention-side rank: pushes to every server and pulls one slot set per server."""

    role = "worker"

    def push_pull(self, push: Sequence[torch.Tensor], push_keys: Sequence[int],
                  pull: Sequence[torch.Tensor], pull_keys: Sequence[int],
                  need_event: bool = False) -> Handle:
        """Sends `push` to every server and receives into `pull` (server-major: with S
        servers and S * P pull tensors, pull[s * P + j] is slot j of server s).

        Tensors are used in place and kept alive until the transfer completes; do not
        write to `pull` before the handle completes. With CUDA tensors, `need_event=True`
        orders the transfer after the work queued so far on the current CUDA stream
        (docs/gpu.md); without it the push must be ready when the call is made.
        """
        stream = _event_stream(need_event, list(push) + list(pull))
        return Handle(self._node, self._node.push_pull(push, push_keys, pull, pull_keys, stream))


@dataclass
class Request:
    """One worker's request in a batch. `tensors` view the received bytes (zero-copy; on
    the same host, views of the worker's own memory when it pushed meshpost.empty tensors).
    """

    handle: int
    worker_rank: int
    tensors: List[torch.Tensor]
    keys: List[int]
    _node: Any = field(repr=False, default=None)
    _outputs: Optional[List[torch.Tensor]] = field(repr=False, default=None)
    _in_place: Optional[List[bool]] = field(repr=False, default=None)

    @property
    def outputs(self) -> List[torch.Tensor]:
        """One writable tensor per pull slot, to compute the answer into. Where the worker
        allocated the slot with meshpost.empty and sits on this host, it *is* the worker's
        slot (mapped here): respond() then sends only the completion. Elsewhere it is a
        fresh tensor of the slot's shape and dtype, sent by respond() like any tensor.
        Views of the worker's slots are valid until respond(), which empties them
        (numel 0)."""
        if self._outputs is None:
            views = self._node.outputs(self.handle)
            slots = self._node.pull_slots(self.handle)
            outs, in_place = [], []
            for view, (_key, dtype, shape, _nbytes) in zip(views, slots):
                in_place.append(view is not None)
                outs.append(view if view is not None
                            else torch.empty(shape, dtype=_torch_dtype(dtype)))
            self._outputs, self._in_place = outs, in_place
        return self._outputs

    def respond(self, tensors: Optional[Sequence[torch.Tensor]] = None,
                need_event: bool = False) -> None:
        """Answers into the worker's pull slots; sizes/dtypes must match them. With no
        tensors, answers with `outputs`. Views of the worker's memory (`outputs`, and
        `tensors` when pushed from shared memory) end here. With CUDA tensors (or CUDA
        `outputs` computed on a stream), `need_event=True` sends the answer only after the
        work queued so far on the current CUDA stream."""
        if tensors is None and self._outputs is None:
            # Outputs never asked for: when every slot is the worker's own (same host), the
            # core answers in place with no tensors at all (two calls fewer per request).
            try:
                self._node.respond([], self.handle)
                return
            except InvalidArgumentError:
                pass  # some slot is ordinary memory: answer with fresh outputs below
        if tensors is None:
            tensors = self.outputs
        if self._outputs is not None and all(self._in_place) and len(tensors) == len(
                self._outputs) and all(t is o for t, o in zip(tensors, self._outputs)):
            tensors = []  # already in the worker's slots: send only the completion
        stream = _event_stream(need_event, list(tensors) + list(self._outputs or []))
        self._node.respond(tensors, self.handle, stream)
        self._end_views()

    def _end_views(self) -> None:
        # The worker may reuse its memory once its handle completes: views of it must not
        # be written (or trusted) after respond, so they become empty tensors.
        # Only the views of the worker's slots: a fresh output tensor was handed to the
        # transport like any respond() tensor and must keep its storage.
        for t, in_place in zip(self._outputs or [], self._in_place or []):
            if in_place:
                t.set_()

    def pull_slots(self) -> List[tuple]:
        """[(key, dtype name, shape, nbytes)] the worker expects back."""
        return list(self._node.pull_slots(self.handle))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8,
           "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
           "bool": torch.bool}


def _event_stream(need_event: bool, tensors: Sequence[Any]) -> Optional[int]:
    """The current CUDA stream (as an int) of the first CUDA tensor, when need_event."""
    if not need_event:
        return None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return torch.cuda.current_stream(t.device).cuda_stream
    return None


def _torch_dtype(name: str) -> torch.dtype:
    # float8 slots have no torch dtype here: their bytes travel as uint8 (same size).
    return _DTYPES.get(name, torch.uint8)


class Server(Node):
    """An FFN-side rank: collects one request from every worker, answers each."""

    role = "server"

    def get_batch(self, timeout: Optional[float] = None) -> List[Request]:
        """One request per worker, in worker-rank order."""
        return [Request(h, rank, tensors, keys, self._node)
                for h, rank, tensors, keys in self._node.get_batch(_ms(timeout))]

    def respond(self, request: Union[Request, int],
                tensors: Optional[Sequence[torch.Tensor]] = None,
                need_event: bool = False) -> None:
        if isinstance(request, Request):
            request.respond(tensors, need_event)
        else:
            tensors = [] if tensors is None else tensors
            self._node.respond(tensors, int(request), _event_stream(need_event, tensors))

    def respond_vec(self, ret_buffer: torch.Tensor, tensors_vec: Sequence[torch.Tensor],
                    requests: Sequence[Union[Request, int]]) -> None:
        """Request i gets rows [off_i, off_i + tensors_vec[i].shape[0]) of ret_buffer,
        off_i being the running sum of the previous row counts."""
        handles = [r.handle if isinstance(r, Request) else int(r) for r in requests]
        self._node.respond_vec(ret_buffer, tensors_vec, handles)

    def register_recv_buffer(self, tensor: torch.Tensor, worker_ranks: Sequence[int],
                             push_keys: Sequence[int]) -> None:
        """Splits `tensor` evenly into len(worker_ranks) chunks; pushes of push_keys[i]
        from worker worker_ranks[i] then land in chunk i (kept alive by meshpost)."""
        self._node.register_recv_buffer(tensor, worker_ranks, push_keys)


class Scheduler(Node):
    """The rendezvous node. Construction waits until every node registered."""

    role = "scheduler"

    def wait_for_exit(self, timeout: Optional[float] = None) -> None:
        """Blocks until every worker and server left (or died), then stops."""
        self._node.stop(_ms(timeout))
        self._node.close(0)
