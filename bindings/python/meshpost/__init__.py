"""meshpost: push/pull communication for attention-FFN disaggregated MoE models.

Two faces over one C++ core:

* this package: ``meshpost.Worker`` / ``meshpost.Server`` / ``meshpost.Scheduler`` with
  keyword options (falling back to the DMLC_* / MESHPOST_* variables), handles with
  ``.wait()`` / ``.done()``, context managers;
* the top-level module ``fserver_lib``: StepMesh's function names, signatures and
  defaults, for code written against StepMesh.

``python -m meshpost.launch --workers 2 --servers 2 script.py`` runs a local cluster.
See docs/python.md.
"""

from __future__ import annotations

from typing import List

import torch  # noqa: F401  (loads libtorch before the extension that links it)

from . import _meshpost
from .errors import (CancelledError, DataLossError, DeadlineExceededError, Error,
                     FailedPreconditionError, InternalError, InvalidArgumentError,
                     InvalidTypeError, NotFoundError, ResourceExhaustedError,
                     UnavailableError, UnimplementedError)
from .errors import ConnectionError, TimeoutError  # noqa: A004 (documented aliases)
from .node import Handle, Node, Request, Scheduler, Server, Trace, Worker
from .shared import empty, is_shared
from ._options import OPTION_VARIABLES

__version__ = "0.1.0"

__all__ = [
    "Worker", "Server", "Scheduler", "Node", "Handle", "Request", "Trace",
    "transports", "supported_dtypes", "empty", "is_shared", "get_nanosecond", "OPTION_VARIABLES",
    "Error", "InvalidArgumentError", "InvalidTypeError", "DeadlineExceededError",
    "UnavailableError", "NotFoundError", "FailedPreconditionError",
    "ResourceExhaustedError", "DataLossError", "CancelledError", "InternalError",
    "UnimplementedError", "TimeoutError", "ConnectionError",
]


def transports() -> List[str]:
    """Transports compiled into this build, highest priority first (e.g. ["cma", "rdma",
    "tcp"]), read from the C++ transport table (van/registry.h). A node's per-peer choice is
    ``node.transports()``."""
    return list(_meshpost.available_transports())


def supported_dtypes() -> str:
    """The torch dtypes meshpost moves."""
    return _meshpost.supported_dtypes()


def get_nanosecond() -> int:
    """Monotonic nanoseconds on the clock used for trace stamps."""
    return _meshpost.get_nanosecond()
