"""Keyword options <-> launch variables.

Every option a meshpost node takes can be given as a keyword argument or through the
environment variable it maps to; keywords win. Validation happens in the C++ core (one
place), so error messages name both the option and its variable.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

# keyword -> environment variable (see docs/python.md and docs/configuration.md)
OPTION_VARIABLES: Dict[str, str] = {
    "root_uri": "DMLC_PS_ROOT_URI",
    "root_port": "DMLC_PS_ROOT_PORT",
    "num_workers": "DMLC_NUM_WORKER",
    "num_servers": "DMLC_NUM_SERVER",
    "group_size": "DMLC_GROUP_SIZE",
    "node_rank": "DMLC_NODE_RANK",
    "instance": "DMLC_INSTANCE_ID",
    "node_host": "DMLC_NODE_HOST",
    "interface": "DMLC_INTERFACE",
    "port": "DMLC_PORT",
    "verbose": "PS_VERBOSE",
    "enable_rdma": "DMLC_ENABLE_RDMA",
    "transport": "MESHPOST_TRANSPORT",
    "heartbeat_interval_ms": "MESHPOST_HEARTBEAT_INTERVAL_MS",
    "heartbeat_timeout_ms": "MESHPOST_HEARTBEAT_TIMEOUT_MS",
    "spin_us": "MESHPOST_SPIN_US",
    "busy_poll": "MESHPOST_BUSY_POLL",
    "start_timeout_ms": "MESHPOST_START_TIMEOUT_MS",
    "max_inflight": "MESHPOST_MAX_INFLIGHT",
    "port_fd": "MESHPOST_PORT_FD",
    # trace capture (docs/profiling.md)
    "trace": "MESHPOST_TRACE",
    "trace_dir": "MESHPOST_TRACE_DIR",
    "trace_file_mb": "MESHPOST_TRACE_FILE_MB",
    "trace_max_files": "MESHPOST_TRACE_MAX_FILES",
    "trace_ring": "MESHPOST_TRACE_RING",
}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def build_env(role: Optional[str], options: Mapping[str, Any],
              environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The variables a node of `role` sees: `environ` (default os.environ) plus `options`.

    Raises meshpost.InvalidTypeError for an unknown keyword.
    """
    from .errors import InvalidTypeError

    env = dict(os.environ if environ is None else environ)
    for name, value in options.items():
        if name not in OPTION_VARIABLES:
            raise InvalidTypeError(
                f"unknown option {name}={value!r}; expected one of "
                f"{', '.join(sorted(OPTION_VARIABLES))}")
        if value is None:
            continue
        env[OPTION_VARIABLES[name]] = _text(value)
        if name == "instance":
            # STEPMESH_GPU takes precedence in the core; a keyword must win over both.
            env["STEPMESH_GPU"] = _text(value)
    if role is not None:
        env["DMLC_ROLE"] = role
    return env
