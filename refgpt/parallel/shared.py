"""ZeRO-1 through a node's shared memory: one copy of the parameters per node, gradients summed
by reading the other ranks' buffers directly instead of sending them through MPI.

On a CPU node the data-parallel ranks are processes on the same memory. MPI's collectives
still move data as messages: an all-reduce of P elements copies about 2 P (d-1)/d of them
through the shared-memory transport on every rank, and ZeRO-1's all-gather of the updated
parameters copies P more. MPI-3 can instead map one allocation into every process of a node
(MPI_Win_allocate_shared), and then a sum over ranks is plain loads.

Storage, for the d ranks of the data-parallel group that share a node (``node``):

    data      one window of P elements, the node's only copy of the parameters
    rows      a second window of d x P elements; row r is rank r's gradient buffer

and rank r owns the columns [r S, (r+1) S), S = P/d, as ZeRO-1's shard. A step:

    backward         rank r accumulates its micro-batches into rows[r] (as without ZeRO)
    sync             every row is complete
    reduce           rows[r][own] = sum_{q < d} rows[q][own], in rank order q = 0, 1, ...
    (across nodes)   MPI_Allreduce of rows[r][own] among the ranks with the same node rank
    clip, AdamW      on data[own] with rows[r][own], moments for the shard only
    sync             every shard of data is updated, every row has been read

Each rank reads P elements and writes S in the reduce (an all-reduce moves about 2 P), and
nothing is gathered afterwards, since every rank reads the same ``data``. Between the syncs
a rank writes only its own row and its own columns of ``data``, so no two processes write
the same element, and no element is read while another process writes it. (A step skipped
for a non-finite gradient norm has no second sync: the norm's all-reduce, which every rank
enters after its sum, orders those reads before the next step's writes.) A sync is
MPI_Win_sync on both windows, a barrier over the node, and MPI_Win_sync again (the memory
barrier the unified memory model of MPI-3 asks for).

Several nodes: the group splits into nodes of equal size d; ranks with the same node rank
hold the same shard on every node and all-reduce it (S elements) after the node's reduce,
so the update runs once per node with identical inputs and every node's copy stays equal.
This is the two-level reduction hierarchical all-reduces use; here its first level needs no
copies.

The gradient sum (the kernel sum_rows) runs in chunks of CHUNK elements that stay in cache
while d rows are added into them, in rank order, so it is the same float sum on every run
and on every backend (numba's runs its chunks on the rank's threads). Parameters are
written by the rank that owns them (initialisation, checkpoint loads), followed by a sync.
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from ..config import ConfigError
from .wire import moved, sum_op
from .zero import ZeroParams

CHUNK = 1 << 16        # elements summed at a time (256 KiB in float32: stays in L2)


@kernel(numba="numba_cpu")
def sum_rows(rows: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """out[...] = rows[0, lo:hi] + rows[1, lo:hi] + ... + rows[d-1, lo:hi], added in that order
    (out may be part of a row), CHUNK columns at a time so that the partial sum stays in
    cache."""
    acc = np.empty(min(CHUNK, hi - lo), out.dtype)
    for a in range(lo, hi, CHUNK):
        part = acc[:min(CHUNK, hi - a)]
        np.copyto(part, rows[0, a:a + part.size])
        for row in rows[1:]:
            part += row[a:a + part.size]
        out[a - lo:a - lo + part.size] = part


class SharedParams(ZeroParams):
    """ZeroParams at stage 1 whose parameter buffer is shared by the ranks of a node and whose
    gradient rows are read by them directly (module docstring). comm: the data-parallel
    communicator; node_comm: its ranks that share memory (default: MPI_COMM_TYPE_SHARED;
    tests pass smaller groups to act as several nodes)."""

    def __init__(self, specs, dtype, comm, node_comm=None, grad_dtype=None):
        from mpi4py import MPI
        self.node = node_comm if node_comm is not None else comm.Split_type(
            MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        sizes = set(comm.allgather(self.node.Get_size()))
        if len(sizes) != 1:
            raise ConfigError(f"--dp-shared-memory needs the same number of data-parallel "
                              f"ranks on every node, got {sorted(sizes)}")
        self.cross = comm.Split(self.node.Get_rank(), comm.Get_rank())   # one rank per node
        super().__init__(specs, dtype, stage=1, comm=self.node, grad_dtype=grad_dtype)
        self.param_shard()[...] = 0                     # MPI does not zero a window; each rank
        self.grad[...] = 0                              # touches its own part first
        self.sync()

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """The two windows, mapped (not yet zeroed: __init__ does it once the shard is known)."""
        from mpi4py import MPI
        n = self.padded
        me, d = self.node.Get_rank(), self.node.Get_size()
        kinds = ((n, self.dtype), (d * n, self.grad_dtype))  # the parameters, the gradient rows
        self.windows = [MPI.Win.Allocate_shared(size * t.itemsize if me == 0 else 0, t.itemsize,
                                                comm=self.node) for size, t in kinds]
        for w in self.windows:
            w.Lock_all(MPI.MODE_NOCHECK)             # a passive epoch for Win.Sync, never ended
        data, rows = (np.frombuffer(w.Shared_query(0)[0], t)
                      for w, (_, t) in zip(self.windows, kinds))
        self.rows = rows.reshape(d, n)
        return data, self.rows[me]

    def free(self) -> None:
        """Give the windows back to MPI (collective over the node). Every array into them is
        dropped here; whoever else still holds one must drop it first (Trainer.close)."""
        self.data = self.grad = self.rows = None
        self._views, self.grads = {}, {}
        for w in self.windows:
            w.Unlock_all()
            w.Free()
        self.windows = []

    def sync(self) -> None:
        """Every rank of the node sees every write made before it (module docstring)."""
        for w in self.windows:
            w.Sync()
        self.node.Barrier()
        for w in self.windows:
            w.Sync()

    # -- parameters: each rank writes its own columns -------------------------------------
    def _write(self, name: str, value: np.ndarray) -> None:
        a, b, piece = self.own_piece(name, value)
        self.param_shard()[a:b] = piece

    def initialise(self, seed: int, shard=None) -> None:
        super().initialise(seed, shard)
        self.sync()

    def load_tensors(self, items) -> None:
        super().load_tensors(items)
        self.sync()

    def writes_own(self, dp_rank: int) -> bool:
        """The ranks of one node partition the copy; other nodes hold the same shards."""
        return self.cross.Get_rank() == 0

    def param_bytes(self) -> int:
        """This rank's part of the node's one copy."""
        return self.data.nbytes // self.d

    def after_step(self) -> None:
        """After the optimizer: nothing to gather, only to wait until every shard is written."""
        self.sync()

    # -- gradients: summed by reading the other rows ------------------------------------
    def ready(self, names) -> None:
        """Nothing starts during backward: the sum reads finished rows (finish)."""

    def finish(self) -> None:
        from mpi4py import MPI
        self.sync()
        (lo, hi), = self.own_runs
        sum_rows(self.rows, lo, hi, self.grad[lo:hi])
        item, S = self.grad_dtype.itemsize, hi - lo
        self.comm_bytes += (self.padded - S) * item          # read from the other rows
        c = self.cross.Get_size()
        if c > 1:
            self.cross.Allreduce(MPI.IN_PLACE, moved(self.grad[lo:hi]), op=sum_op(self.grad_dtype))
            self.comm_bytes += 2 * S * (c - 1) / c * item

    def grad_squares(self, counted) -> float:
        """Counted on one node only: the other nodes hold the same shard."""
        return super().grad_squares(counted) if self.cross.Get_rank() == 0 else 0.0
