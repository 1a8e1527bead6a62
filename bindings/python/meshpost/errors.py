"""Exceptions raised by meshpost.

Every error meshpost raises subclasses :class:`Error` *and* the builtin exception that
fits, so ``except ValueError`` / ``except TimeoutError`` / ``except ConnectionError`` work
as well as ``except meshpost.Error``. Each class carries the core status code name in
``code``.
"""

from __future__ import annotations

import builtins

__all__ = [
    "Error",
    "InvalidArgumentError",
    "InvalidTypeError",
    "DeadlineExceededError",
    "UnavailableError",
    "NotFoundError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "DataLossError",
    "CancelledError",
    "InternalError",
    "UnimplementedError",
]


class Error(Exception):
    """Base class of every meshpost exception."""

    code = "UNKNOWN"

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(Error, ValueError):
    """A bad argument value (wrong length, shape, size, dtype for the slot, ...)."""

    code = "INVALID_ARGUMENT"


class InvalidTypeError(Error, builtins.TypeError):
    """An argument of the wrong type (not a tensor, not an int, unsupported dtype)."""

    code = "INVALID_ARGUMENT"


class DeadlineExceededError(Error, builtins.TimeoutError):
    """A wait ran out of time. The operation itself may still complete later."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(Error, builtins.ConnectionError):
    """A peer died, left, or cannot be reached."""

    code = "UNAVAILABLE"


class NotFoundError(Error, KeyError, ValueError):
    """An unknown (or already answered) handler, key or node."""

    code = "NOT_FOUND"


class FailedPreconditionError(Error, RuntimeError):
    """A call made in the wrong state (not started, wrong role, already stopped)."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(Error, RuntimeError):
    """A bounded table (e.g. requests in flight) is full."""

    code = "RESOURCE_EXHAUSTED"


class DataLossError(Error, RuntimeError):
    """Malformed bytes arrived from a peer."""

    code = "DATA_LOSS"


class CancelledError(Error, RuntimeError):
    """The operation was cancelled because the node stopped."""

    code = "CANCELLED"


class InternalError(Error, RuntimeError):
    """meshpost broke one of its own invariants (please report it)."""

    code = "INTERNAL"


class UnimplementedError(Error, NotImplementedError):
    """A feature or hardware this build does not have (RDMA, CUDA)."""

    code = "UNIMPLEMENTED"


# Convenience aliases named after the builtins they extend.
TimeoutError = DeadlineExceededError  # noqa: A001
ConnectionError = UnavailableError  # noqa: A001
