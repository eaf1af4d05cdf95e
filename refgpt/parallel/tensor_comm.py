"""The communication of Megatron-style tensor parallelism, as layers with a backward.

Over the tensor-parallel group of t ranks (Megatron-LM, Narayanan et al. 2021, sec. 2.3;
sequence parallelism: Korthikanti et al. 2022, sec. 4.2.2):

    f  CopyToTP        forward identity            backward all-reduce       (enters a TP region)
    g  ReduceFromTP    forward all-reduce           backward identity         (leaves a TP region)
    g~ GatherSeq       forward all-gather tokens    backward reduce-scatter   (SP: enters)
    f~ ScatterSeq      forward reduce-scatter       backward all-gather       (SP: leaves)

and, around a layer that every rank runs on the whole sequence (the MoE layer, whose input
gradient each rank then holds whole): GatherSeqWhole (forward all-gather, backward this
rank's part) and SplitSeq (forward this rank's part, backward all-gather).

Activations are [B, T, C]; the sequence-parallel ops split and join the token axis T.

TPComm counts, per (site, collective), the elements each rank moves in a ring
implementation: all-reduce of n elements 2(t-1)/t n, all-gather to n elements (t-1)/t n,
reduce-scatter of n elements (t-1)/t n. One transformer layer then moves 8 N h (t-1)/t
elements (N = B T tokens) with or without sequence parallelism.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..backend import to_device, to_host
from ..precision import narrow, wide
from .wire import moved


def host_copy(x) -> np.ndarray:
    """A contiguous host array holding x's values, not sharing x's memory (a GPU array is
    copied to the host once the work queued on it is done): MPI reads and writes host memory."""
    h = to_host(x)
    return h.copy() if h is x else np.ascontiguousarray(h)


class TPComm:
    """Collectives over the tensor-parallel group, on host buffers: under the cupy backend
    each goes through the host (copied over, reduced, copied back). 16-bit activations are
    summed in fp32 and rounded once, and gathered as their bytes (refgpt.parallel.wire)."""

    def __init__(self, comm):
        self.comm = comm
        self.t, self.rank = comm.Get_size(), comm.Get_rank()
        self.volume: dict[tuple[str, str], float] = defaultdict(float)

    def allreduce(self, x: np.ndarray, site: str, op: str = "sum", dtype=None) -> np.ndarray:
        """The sum (or max) over the group, in x's compute type, rounded to dtype (x's)."""
        from mpi4py import MPI
        buf = host_copy(wide(x))
        self.comm.Allreduce(MPI.IN_PLACE, buf, op={"sum": MPI.SUM, "max": MPI.MAX}[op])
        self.volume[(site, "all-reduce")] += 2 * (self.t - 1) / self.t * buf.size
        return to_device(narrow(buf, dtype or x.dtype))

    def allgather(self, x: np.ndarray, axis: int, site: str) -> np.ndarray:
        x = np.ascontiguousarray(to_host(x))
        buf = np.empty((self.t, *x.shape), x.dtype)
        self.comm.Allgather(moved(x), moved(buf))
        self.volume[(site, "all-gather")] += (self.t - 1) / self.t * buf.size
        return to_device(np.concatenate(list(buf), axis=axis))

    def reduce_scatter(self, x: np.ndarray, axis: int, site: str, dtype=None) -> np.ndarray:
        """This rank's chunk (along axis) of the sum over the group, rounded to dtype (x's)."""
        chunks = np.ascontiguousarray(np.stack(np.split(wide(to_host(x)), self.t, axis=axis)))
        out = np.empty(chunks.shape[1:], chunks.dtype)
        self.comm.Reduce_scatter_block(chunks, out)
        self.volume[(site, "reduce-scatter")] += (self.t - 1) / self.t * x.size
        return to_device(narrow(out, dtype or x.dtype))

    def layer_volume(self, prefix: str) -> float:
        """Elements moved by the sites under prefix (e.g. "h.0.") since the counters began."""
        return sum(v for (site, _), v in self.volume.items() if site.startswith(prefix))


class CopyToTP:
    """Identity forward; backward sums the partial input gradients (fp32 in a 16-bit run,
    refgpt.parallel.tensor) and rounds them to the activations' type."""

    def __init__(self, tp: TPComm, site: str):
        self.tp, self.site = tp, site
        self.dtype = None

    def forward(self, x):
        self.dtype = x.dtype
        return x

    def backward(self, dy):
        return self.tp.allreduce(dy, self.site, dtype=self.dtype)


class ReduceFromTP:
    def __init__(self, tp: TPComm, site: str):
        self.tp, self.site = tp, site

    def forward(self, x):
        return self.tp.allreduce(x, self.site)

    def backward(self, dy):
        return dy


class GatherSeq:
    """Forward gathers the sequence; backward reduce-scatters the partial input gradients,
    rounded to the activations' type as CopyToTP's."""

    def __init__(self, tp: TPComm, site: str):
        self.tp, self.site = tp, site
        self.dtype = None

    def forward(self, x):                                   # [B, T/t, C] -> [B, T, C]
        self.dtype = x.dtype
        return self.tp.allgather(x, 1, self.site)

    def backward(self, dy):                                 # [B, T, C] -> [B, T/t, C]
        return self.tp.reduce_scatter(dy, 1, self.site, dtype=self.dtype)


class ScatterSeq:
    def __init__(self, tp: TPComm, site: str):
        self.tp, self.site = tp, site

    def forward(self, x):                                   # [B, T, C] partial -> [B, T/t, C]
        return self.tp.reduce_scatter(x, 1, self.site)

    def backward(self, dy):
        return self.tp.allgather(dy, 1, self.site)


class GatherSeqWhole:
    """Forward gathers the sequence; backward keeps this rank's part of a gradient that every
    rank holds whole (a layer that ran on every token on every rank: the experts,
    refgpt.nn.moe), where GatherSeq would sum the copies."""

    def __init__(self, tp: TPComm, site: str):
        self.tp, self.site = tp, site

    def forward(self, x):                                   # [B, T/t, C] -> [B, T, C]
        return self.tp.allgather(x, 1, self.site)

    def backward(self, dy):                                 # [B, T, C] -> [B, T/t, C]
        return _own_part(dy, self.tp)


class SplitSeq:
    """Forward keeps this rank's part of the sequence of an output every rank holds whole;
    backward gathers the gradient's sequence."""

    def __init__(self, tp: TPComm, site: str):
        self.tp, self.site = tp, site

    def forward(self, x):                                   # [B, T, C] -> [B, T/t, C]
        return _own_part(x, self.tp)

    def backward(self, dy):
        return self.tp.allgather(dy, 1, self.site)


def _own_part(x, tp: TPComm):
    T = x.shape[1] // tp.t
    return np.ascontiguousarray(x[:, tp.rank * T:(tp.rank + 1) * T])
