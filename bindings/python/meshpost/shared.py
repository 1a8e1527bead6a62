"""Tensors in memory meshpost can share with same-host peers.

``empty(shape, dtype)`` returns an ordinary CPU torch tensor whose storage is a memfd
block (2 MiB aligned, huge-page advised) registered with meshpost. Pushed from, such a
tensor reaches a same-host server as a view of this memory (no copy); pulled into, the
server writes the answer straight into it (``Request.outputs``). Across hosts it behaves
like any other tensor. Freeing the tensor (its last view) frees the block. docs/python.md
has the lifetime rules.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from . import _meshpost
from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["empty", "is_shared"]


def empty(shape: Union[int, Sequence[int]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A contiguous CPU tensor of `shape` and `dtype` in shared memory (contents undefined)."""
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InvalidTypeError(
            f"empty: shape={shape!r}; expected an int or a sequence of ints") from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"empty: shape={dims}; expected non-negative dimensions")
    if not isinstance(dtype, torch.dtype):
        raise InvalidTypeError(f"empty: dtype={dtype!r}; expected a torch.dtype")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(dims) * itemsize
    raw = _meshpost.alloc_shared(max(nbytes, itemsize))
    return raw[:nbytes].view(dtype).view(dims)


def is_shared(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s bytes lie in one shared block (what empty() returns, or a view)."""
    return bool(_meshpost.is_shared(tensor))
