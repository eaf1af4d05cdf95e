"""SUMMA: matrix products on a q x q process grid (van de Geijn & Watts 1997), the kernel of
2-D tensor parallelism (Optimus, Xu et al. 2021; the Fugaku GPT work's attention).

The t = q^2 ranks of a tensor-parallel group form a grid; rank tau = i q + j sits in row i and
column j. row_comm joins the ranks of row i (ordered by j), col_comm those of column j
(ordered by i). A matrix A [M, K] is split into q x q blocks and rank (i, j) holds A_ij
[M/q, K/q]. For C = A B, block C_ij = sum_k A_ik B_kj, and the q terms are computed in q
steps; at step k the blocks of the k-th block column of A and the k-th block row of B travel:

            B_k0 B_k1 B_k2          step k: row i broadcasts A_ik from its rank (i, k),
    A_0k  [ C_00 C_01 C_02 ]                column j broadcasts B_kj from its rank (k, j),
    A_1k  [ C_10 C_11 C_12 ]                every rank adds A_ik B_kj to its C_ij.
    A_2k  [ C_20 C_21 C_22 ]

The two transposed variants that backward needs keep every block where it is and move the
partial products instead:

    C = A B^T  (dX = dY W^T):  step k: column j broadcasts B_kj; P = A_ij B_kj^T;
                               row i reduces P to rank (i, k), which keeps C_ik.
    C = A^T B  (dW = X^T dY):  step k: row i broadcasts A_ik; P = A_ik^T B_ij;
                               column j reduces P to rank (k, j), which keeps C_kj.

So a 2-D linear layer Y = X W runs AB forward and ABT (dX) + ATB (dW) backward, and its
output Y_ij has the layout of X_ij: layers chain without re-layout. Each step's broadcast is
issued non-blocking (MPI_Ibcast) one step ahead, so the next step's blocks travel while the
current product is computed.

Per call, a rank receives about (q-1)/q of the blocks it needs from others: for AB,
(q-1) (|A_ik| + |B_kj|) elements (the counters below).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..backend import array_module, to_device, to_host
from ..nn.linear import add_matmul, matmul
from ..precision import compute_dtype, narrow, wide
from .wire import moved


class SummaGrid:
    """The row and column communicators of a q x q tensor-parallel group (collective)."""

    def __init__(self, tp_comm):
        t = tp_comm.Get_size()
        q = int(round(t ** 0.5))
        if q * q != t:
            raise ValueError(f"2-D tensor parallelism needs a square TP size, got {t}")
        self.comm, self.q, self.rank = tp_comm, q, tp_comm.Get_rank()
        self.i, self.j = divmod(self.rank, q)
        self.row = tp_comm.Split(color=self.i, key=self.j)       # same i, ordered by j
        self.col = tp_comm.Split(color=self.j, key=self.i)       # same j, ordered by i
        self.received = 0                                        # elements from other ranks
        self.messages = 0
        self.by_site: dict[str, list] = defaultdict(lambda: [0, 0])   # site -> [elements, messages]

    def count(self, site: str, elements: int, messages: int) -> None:
        self.received += elements
        self.messages += messages
        self.by_site[site][0] += elements
        self.by_site[site][1] += messages

    def layer_volume(self, prefix: str) -> tuple[int, int]:
        """(elements, messages) received by the products of the sites under prefix."""
        hits = [v for site, v in self.by_site.items() if site.startswith(prefix)]
        return sum(v[0] for v in hits), sum(v[1] for v in hits)


def _bcast_steps(comm, mine: np.ndarray, q: int, grid: SummaGrid, site: str):
    """Yield, for k = 0..q-1, the block that comm's rank k broadcasts (shape of mine), with
    step k+1's broadcast already in flight while the caller uses step k's block. The
    broadcasts run on host buffers (under the cupy backend a block is copied over before it
    is sent and back when it has arrived)."""
    mine_h = np.ascontiguousarray(to_host(mine))             # what MPI sends and receives
    def start(k):
        buf = mine_h if comm.Get_rank() == k else np.empty_like(mine_h)
        return buf, comm.Ibcast(moved(buf), root=k)
    nxt = start(0)
    for k in range(q):
        buf, req = nxt
        if k + 1 < q:
            nxt = start(k + 1)
        req.Wait()
        if comm.Get_rank() != k:
            grid.count(site, buf.size, 1)
            yield to_device(buf)
        else:
            yield mine


def matmul_ab(grid: SummaGrid, a: np.ndarray, b: np.ndarray, site: str = "",
              keep_wide: bool = False) -> np.ndarray:
    """C_ij = sum_k A_ik B_kj, for A_ij [M/q, K/q] and B_ij [K/q, N/q] on rank (i, j).
    site names the caller in the grid's counters. 16-bit operands: summed in fp32, and
    rounded once at the end unless keep_wide."""
    q, dtype = grid.q, np.result_type(a.dtype, b.dtype)
    c = array_module().zeros((a.shape[0], b.shape[1]), compute_dtype(dtype))
    a_steps = _bcast_steps(grid.row, a, q, grid, site)
    b_steps = _bcast_steps(grid.col, b, q, grid, site)
    for a_ik, b_kj in zip(a_steps, b_steps):
        add_matmul(c, a_ik, b_kj)                          # 16 bits: summed in fp32
    return c if keep_wide else narrow(c, dtype)


def matmul_abt(grid: SummaGrid, a: np.ndarray, b: np.ndarray, site: str = "") -> np.ndarray:
    """C = A B^T: C_ik = sum_j A_ij B_kj^T, for A_ij [M/q, N/q], B_ij [K/q, N/q]; returns
    C_ij [M/q, K/q] on rank (i, j) (the sum over the row, reduced to its owner; 16 bits:
    the partial products and their sum in fp32, rounded once)."""
    aw = wide(a)
    c = _reduce_products(grid, grid.col, b, grid.row, grid.j,
                         lambda b_kj: matmul(aw, wide(b_kj).T), site)
    return narrow(c, np.result_type(a.dtype, b.dtype))


def matmul_atb(grid: SummaGrid, a: np.ndarray, b: np.ndarray, site: str = "") -> np.ndarray:
    """C = A^T B: C_kj = sum_i A_ik^T B_ij, for A_ij [M/q, K/q], B_ij [M/q, N/q]; returns
    C_ij [K/q, N/q] on rank (i, j) (the sum over the column, reduced to its owner; in fp32 for
    16-bit operands, left in fp32: it is a weight's gradient)."""
    bw = wide(b)
    return _reduce_products(grid, grid.row, a, grid.col, grid.i,
                            lambda a_ik: matmul(wide(a_ik).T, bw), site)


def _reduce_products(grid, bcast_comm, moving, reduce_comm, my_coord: int, product, site):
    """At step k, the k-th block of `moving` arrives over bcast_comm; product(block) is this
    rank's term of the result block that reduce_comm's rank k owns, and is reduced there."""
    from mpi4py import MPI
    c = None
    for k, blk in enumerate(_bcast_steps(bcast_comm, moving, grid.q, grid, site)):
        part = np.ascontiguousarray(to_host(product(blk)))
        mine = my_coord == k
        out = np.empty_like(part) if mine else None
        reduce_comm.Reduce(part, out, op=MPI.SUM, root=k)
        if mine:
            c = to_device(out)
        else:
            grid.count(site, 0, 1)
    grid.count(site, c.size * (grid.q - 1), 0)                 # q-1 partial sums arrive
    return c
