"""16-bit arrays through MPI. MPI has no bfloat16 (and half precision only as an extension of
some MPIs), so refgpt never hands MPI a 16-bit type:

    moved   (send, receive, broadcast, gather): the bytes, as uint16 views
    summed  the partial sums of activations and their gradients (tensor parallelism's
            all-reduces and reduce-scatters, SUMMA's products): widened to fp32, summed in
            fp32, and rounded once where they are stored, so a layout rounds where one process
            rounds its single fp32 sum
    bf16 gradients (--grad-reduce-in-bf16, where the bytes are the point): summed in 16 bits
            by a user-defined MPI operation, each pairwise sum in fp32 and rounded
"""

from __future__ import annotations

import functools

import numpy as np

from ..precision import is_half


def moved(a: np.ndarray) -> np.ndarray:
    """What MPI moves for a: a 16-bit array's bytes as uint16 (a view), else a itself."""
    return a.view(np.uint16) if is_half(a.dtype) else a


def sum_op(dtype):
    """The MPI operation that sums arrays of dtype (MPI.SUM, or the 16-bit one)."""
    from mpi4py import MPI
    return _half_sum(np.dtype(dtype)) if is_half(dtype) else MPI.SUM


@functools.lru_cache(maxsize=None)
def _half_sum(dtype: np.dtype):
    """A user-defined MPI op that adds 16-bit arrays of this dtype (sent as uint16)."""
    from mpi4py import MPI

    def add(invec, inoutvec, datatype):
        a = np.frombuffer(invec, np.uint16).view(dtype)
        b = np.frombuffer(inoutvec, np.uint16).view(dtype)
        b[...] = (a.astype(np.float32) + b.astype(np.float32)).astype(dtype)
    return MPI.Op.Create(add, commute=True)
