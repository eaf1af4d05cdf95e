"""The 1-bit all-reduce of 1-bit Adam (Tang et al. 2021), with error feedback, as DeepSpeed's
MPI backend computes it (deepspeed.runtime.comm.mpi: compressed_allreduce), written on
mpi4py's Alltoall and Allgather.

Every one of d ranks holds a vector x_i; the result, on every rank, approximates their mean
(1/d) sum_i x_i while each rank sends about 2 bits per element instead of 2 words. Per
tensor of the vector (a parameter's run of the flat buffer, zero-padded to N elements, a
multiple of d lcm(d, 8), so that each rank's chunk of N / d packs into whole bytes):

    worker i     b_i = x_i + e_i                           e_i: the worker's error, kept
                 s_i = ||b_i|| / sqrt(N)                   one scale per tensor
                 e_i <- b_i - s_i sign(b_i)                sign(0) = +1
                 sends chunk j of sign(b_i), as bits, to rank j (Alltoall), and s_i to all
    server j     c   = sum_i (s_i / d) sign(b_i)[chunk j] + E_j     E_j: the server's error
                 S_j = ||c|| / sqrt(N / d)
                 E_j <- c - S_j sign(c)
                 sends sign(c), as bits, and S_j to all (Allgather)
    every rank   the result's chunk j = S_j sign(c_j)

The errors carry what one step's signs dropped into the next step's, which is what lets the
sign compress a slowly changing quantity (Adam's momentum) without drift. Bytes one rank
sends per call: (d - 1)/d x N_total / 8 twice (the signs out and back) and its scales (d - 1)
x 2 tensors' words: 8 x itemsize times fewer than a ring all-reduce of the same vector, less
the padding (``sent_bytes``; ``padded``).

Written out here rather than taken from a library because it is the lesson: no MPI or
mpi4py call compresses.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import to_device, to_host
from .wire import moved


class CompressedAllreduce:
    """The 1-bit all-reduce over comm of the tensors (lo, hi) of a flat buffer, with this
    rank's worker and server errors (zero to start, and after reset())."""

    def __init__(self, comm, tensors: list[tuple[int, int]], dtype):
        self.comm, self.tensors, self.dtype = comm, sorted(tensors), np.dtype(dtype)
        d = self.d = comm.Get_size()
        unit = d * (d * 8 // math.gcd(d, 8))             # d lcm(d, 8), DeepSpeed's padding
        self.sizes = [hi - lo for lo, hi in self.tensors]
        self.padded_sizes = [-(-n // unit) * unit for n in self.sizes]
        self.chunks = [n // d for n in self.padded_sizes]
        self.padded = sum(self.padded_sizes)
        self.worker_error = np.zeros(self.padded, self.dtype)
        self.server_error = np.zeros(self.padded // d, self.dtype)
        self.sent_bytes = 0

    @property
    def error_bytes(self) -> int:
        return self.worker_error.nbytes + self.server_error.nbytes

    def reset(self) -> None:
        """Forget both errors (as DeepSpeed does when it loads a checkpoint)."""
        self.worker_error[...] = 0
        self.server_error[...] = 0

    def __call__(self, buffer) -> None:
        """buffer (the flat buffer, in place) <- the compressed mean of every rank's buffer
        (a GPU's: through a host copy)."""
        x = to_host(buffer)
        self._reduce(x)
        if x is not buffer:
            buffer[...] = to_device(x)

    def _reduce(self, x: np.ndarray) -> None:
        d, T, t_ = self.d, len(self.tensors), self.dtype.type
        scale, bits = np.empty(T, self.dtype), np.empty(self.padded, bool)
        at = 0
        for t, ((lo, hi), n) in enumerate(zip(self.tensors, self.padded_sizes)):
            error = self.worker_error[at:at + n]
            b = error.copy()                                   # the tensor, padded, plus
            b[:hi - lo] += x[lo:hi]                            # the worker's error
            scale[t] = np.linalg.norm(b) / math.sqrt(n)
            sign = bits[at:at + n]
            np.greater_equal(b, 0, out=sign)
            np.subtract(b, np.where(sign, scale[t], -scale[t]), out=error)
            at += n
        # rank j's chunk of every tensor, side by side: row j of [d, padded / d]
        rows = np.concatenate([part.reshape(d, c) for part, c in
                               zip(np.split(bits, np.cumsum(self.padded_sizes)[:-1]),
                                   self.chunks)], axis=1)
        send = np.packbits(rows, axis=1)
        recv = np.empty_like(send)
        self.comm.Alltoall(moved(send), moved(recv))
        scales = np.empty((d, T), self.dtype)
        self.comm.Allgather(moved(scale), moved(scales))
        # server: the mean of the workers' scaled signs of this rank's chunks, and its error
        theirs = np.unpackbits(recv, axis=1).view(bool)                # [d, padded / d]
        server_scale, cbits = np.empty(T, self.dtype), np.empty(self.padded // d, bool)
        col = 0
        for t, c in enumerate(self.chunks):
            part = slice(col, col + c)
            mean = np.zeros(c, self.dtype)
            for i in range(d):
                s = t_(scales[i, t] / d)
                mean += np.where(theirs[i, part], s, -s)
            mean += self.server_error[part]
            server_scale[t] = np.linalg.norm(mean) / math.sqrt(c)
            np.greater_equal(mean, 0, out=cbits[part])
            np.subtract(mean, np.where(cbits[part], server_scale[t], -server_scale[t]),
                        out=self.server_error[part])
            col += c
        packed = np.packbits(cbits)
        gathered = np.empty((d, packed.size), np.uint8)
        self.comm.Allgather(moved(packed), moved(gathered))
        server_scales = np.empty((d, T), self.dtype)
        self.comm.Allgather(moved(server_scale), moved(server_scales))
        self.sent_bytes += (d - 1) * (send[0].nbytes + scale.nbytes + packed.nbytes
                                      + server_scale.nbytes)
        # every rank: tensor t's chunk j is S_j,t sign(c_j,t)
        signs_of = np.unpackbits(gathered, axis=1).view(bool)        # [d, padded / d]
        col = 0
        for t, ((lo, hi), c) in enumerate(zip(self.tensors, self.chunks)):
            for j in range(d):
                a, b = lo + j * c, min(hi, lo + (j + 1) * c)
                if a < b:                                      # (the padding is dropped)
                    S = server_scales[j, t]
                    x[a:b] = np.where(signs_of[j, col:col + b - a], S, -S)
            col += c
