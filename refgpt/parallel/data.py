"""Data parallelism: each of d ranks computes the gradient of its share of the global batch;
the shares are summed so every rank holds the gradient of the whole batch.

Because each micro-batch's loss is divided by the token count of the *global* batch (see
refgpt.nn.loss), the sum over ranks (and over the m micro-batches a rank accumulates) is
exactly the single-process gradient:

    g = sum_{r < d} sum_{j < m} grad L_{r,j},    L_{r,j} = (token losses of micro-batch j of rank r) / (G T)

The sum (GradAllReduce) runs over the flat gradient buffer in *buckets*: contiguous runs of whole parameters,
filled in the order backward finishes them (last block first). During the last micro-batch's
backward, a bucket's non-blocking all-reduce (MPI_Iallreduce, in place) starts as soon as all
of its parameters are final, so communication overlaps the rest of backward; the optimizer
waits for all of them. Earlier micro-batches only accumulate locally (no communication).
The token table is final only after the embedding's backward (it also feeds the tied head),
so its bucket goes last. ``bucket_elems = 0`` puts everything in one bucket, reduced after
backward: the same numbers, no overlap. At most IN_FLIGHT all-reduces run at once (MPI's
non-blocking collectives allocate temporaries per request; all buckets in flight would cost
another gradient's worth of memory). Under the cupy backend the gradients live on a GPU and
MPI is not assumed to read GPU memory: a bucket is copied to the host once the GPU's queued
work is done, reduced there, and copied back when its all-reduce completes.

Overlap pays only where the network progresses on its own. Most MPIs advance a non-blocking
collective only inside MPI calls, and on a CPU node the "network" is other cores copying
memory, so with every core computing there is little to overlap with. ``overlap=False``
(``--no-overlap-grad-reduce``) reduces the buckets after backward with blocking MPI_Allreduce,
which uses the MPI's tuned algorithms; docs/scaling/ measures both.
"""

from __future__ import annotations

import time

import numpy as np

from ..backend import synchronize, to_device, to_host
from .sync import GradSync, squares
from .wire import moved, sum_op

IN_FLIGHT = 2      # gradient collectives left running while backward goes on (also ZeRO's)


class GradAllReduce(GradSync):
    """The all-reduce of the gradient buffer in buckets, over the data-parallel group (the
    gradient-sync interface of refgpt.parallel.sync)."""

    def __init__(self, params, dp_comm, bucket_elems: int, overlap: bool = True, groups=None,
                 allreduce=None):
        """Backward finishes the parameters in the reverse of the flat buffer's order (last
        block first; refgpt.nn.gpt), so buckets are runs of whole parameters from the end.
        overlap False: no all-reduce during backward; finish() reduces the buckets one after
        another with blocking MPI_Allreduce (MPI's tuned algorithms, no progress needed).
        groups(name): the communicator a parameter's gradient is summed over, where it is not
        dp_comm (expert parallelism: an expert's over its expert-data-parallel group); a
        bucket holds parameters of one group only. allreduce(comm, buffer): a hand-written
        algorithm (refgpt.parallel.collectives) for the blocking sums after backward, in
        place of MPI_Allreduce (with overlap False)."""
        self.params, self.grad, self.comm, self.overlap = params, params.grad, dp_comm, overlap
        self.allreduce = allreduce
        group = groups or (lambda n: dp_comm)
        names = sorted(params.slices, key=lambda n: params.slices[n][0], reverse=True)
        self.buckets: list[tuple[int, int, set]] = []        # (lo, hi, parameter names)
        self.groups: list = []                               # each bucket's communicator
        current, count = [], 0
        for i, n in enumerate(names):
            lo, hi = params.slices[n]
            current.append(n)
            count += hi - lo
            last = i == len(names) - 1
            if (bucket_elems and count >= bucket_elems) or last or group(names[i + 1]) != group(n):
                self.buckets.append((params.slices[current[-1]][0],
                                     params.slices[current[0]][1], set(current)))
                self.groups.append(group(n))
                current, count = [], 0
        self.pending: list = []
        self.waiting: list[set] = []
        self.comm_bytes = 0.0        # a ring all-reduce of n elements sends 2 n (d-1)/d of them

    def start(self) -> None:
        """Arm the buckets before the last micro-batch's backward."""
        self.waiting = [set(b[2]) for b in self.buckets]
        self.pending = []
        self.blocked_s = 0.0         # seconds ready() waits for an older bucket this step

    def ready(self, names) -> None:
        """Backward calls this with parameters whose gradients are final. Each call also lets
        MPI move the collectives in flight along (most MPIs progress a non-blocking collective
        only inside MPI calls); a wait forced by the IN_FLIGHT bound counts in blocked_s."""
        from mpi4py import MPI
        if self.pending:
            MPI.Request.Testall([p[0] for p in self.pending])
        for (lo, hi, _), left, comm in zip(self.buckets, self.waiting, self.groups):
            if left:
                left.difference_update(names)
                if not left and self.overlap:
                    buf, host = self._host(lo, hi, comm)
                    req = comm.Iallreduce(MPI.IN_PLACE, moved(buf), op=sum_op(buf.dtype))
                    self.pending.append((req, lo, hi, host))
                    if len(self.pending) > IN_FLIGHT:
                        t0 = time.perf_counter()
                        self._land(self.pending.pop(0))
                        self.blocked_s += time.perf_counter() - t0

    def finish(self) -> None:
        """Block until every bucket is reduced (before clipping and the optimizer)."""
        from mpi4py import MPI
        if any(self.waiting):
            raise RuntimeError("some gradient buckets were never ready: backward skipped a parameter")
        if not self.overlap:
            for (lo, hi, _), comm in zip(self.buckets, self.groups):
                buf, host = self._host(lo, hi, comm)
                if self.allreduce is not None:
                    self.allreduce(comm, buf)
                else:
                    comm.Allreduce(MPI.IN_PLACE, moved(buf), op=sum_op(buf.dtype))
                self.pending.append((MPI.REQUEST_NULL, lo, hi, host))
        MPI.Request.Waitall([p[0] for p in self.pending])
        for p in self.pending:
            self._land(p)
        self.pending = []

    def free(self) -> None:
        if self.allreduce is not None:
            self.allreduce.free()

    def grad_squares(self, counted) -> float:
        """Every rank of a bucket's group holds the whole sum: the group's rank 0 counts it."""
        if all(c is self.comm for c in self.groups):
            return squares(self.params, counted) if self.comm.Get_rank() == 0 else 0.0
        mine = {n for (_, _, names), c in zip(self.buckets, self.groups) if c.Get_rank() == 0
                for n in names}
        return squares(self.params, lambda n: n in mine and counted(n))

    def _host(self, lo: int, hi: int, comm):
        """The bucket as MPI will read it (a GPU bucket: a host copy, also returned second);
        counts its traffic."""
        d = comm.Get_size()
        self.comm_bytes += 2 * (hi - lo) * (d - 1) / d * self.grad.itemsize
        buf, host = self.grad[lo:hi], None
        if not isinstance(buf, np.ndarray):
            synchronize()
            buf = host = to_host(buf)
        return buf, host

    def _land(self, pending) -> None:
        req, lo, hi, host = pending
        req.Wait()
        if host is not None:
            self.grad[lo:hi] = to_device(host)
