"""Collectives written on MPI point-to-point: the algorithms inside NCCL and MPI libraries,
written out to be read, measured and compared (MPI's own collectives remain the default; this
module is the lesson, not a replacement).

Costs in the alpha-beta model: a message of m bytes takes alpha + m beta; p ranks; n bytes.

Ring reduce-scatter. The buffer is cut into p blocks (block s: counts[s] elements, the last
ones possibly shorter). In step t = 0 .. p-2 rank r sends its running sum of block
(r - t - 1) mod p to rank r + 1 and adds the block (r - t - 2) mod p it receives from r - 1
to its own; after p - 1 steps rank r holds the sum of block r, added in the order
x_{r+1} + x_{r+2} + ... + x_r (cyclically).

    T_rs = (p - 1) alpha + (p - 1)/p n beta                 (plus (p - 1)/p n adds)

Ring all-gather: the same ring with no adds; rank r starts with block r and in step t sends
block (r - t) mod p, receives block (r - t - 1) mod p.  T_ag = T_rs.

Ring all-reduce = reduce-scatter, then all-gather: 2 (p - 1) alpha + 2 (p - 1)/p n beta.
Bandwidth-optimal (every rank sends each byte about twice), but the latency grows with p.

Double binary tree all-reduce (Sanders, Speck and Traeff 2009; NCCL 2.4). Ranks 0..p-1 are
laid out as an in-order binary tree: position i = r + 1 in 1..p has height h = the number of
trailing zero bits of i, children i -/+ 2^(h-1) and the parent i -/+ 2^h; the leaves are the
odd positions, i.e. the even ranks. A second tree is the first with the ranks mirrored
(r -> p - 1 - r) for even p, or shifted (r -> r + 1 mod p) for odd p, so its interior ranks
are the first tree's leaves: every rank is interior in at most one tree, and sends and
receives about n bytes in all. Half the buffer goes over each tree, in k chunks: a chunk is
reduced up the tree (a node adds its children's chunk to its own and sends the sum to its
parent) and broadcast back down, and chunk c + 1 climbs while chunk c descends:

    T_tree ~ 2 (log2 p + k) alpha + 2 (n / 2) (1 + 1/k) beta x 2 trees in parallel
           ~ 2 (log2 p + k) alpha + n (1 + 1/k) beta

so its latency grows with log p, where the ring's grows with p.

Hierarchical all-reduce: the ranks of a node (MPI_Comm_split_type SHARED) copy their buffers
into rows of one MPI-3 shared-memory window; each rank sums its 1/q of the columns over the
q rows (plain loads, no messages) into row 0; the node's rank 0 all-reduces row 0 with the
other nodes' rank 0 (MPI_Allreduce: the inter-node traffic falls by the q ranks a node
has); every rank copies row 0 back. Within a node: 2 copies of n and a read of n (q - 1)/q
per rank, no message.
"""

from __future__ import annotations

import numpy as np

from ..config import ALLREDUCE_ALGORITHMS as ALGORITHMS
from .shared import sum_rows
from .wire import moved, sum_op


def blocks(n: int, p: int) -> tuple[list[int], list[int]]:
    """counts, displs: n elements cut into p contiguous blocks, the first n mod p one longer."""
    counts = [n // p + (1 if s < n % p else 0) for s in range(p)]
    return counts, displacements(counts)


def displacements(counts: list[int]) -> list[int]:
    """Where each of the contiguous blocks of these lengths starts."""
    return [sum(counts[:s]) for s in range(len(counts))]


def _parts(counts: list[int]) -> list[slice]:
    return [slice(d, d + c) for d, c in zip(displacements(counts), counts)]


def ring_reduce_scatter(comm, x: np.ndarray, counts: list[int]) -> np.ndarray:
    """The sum over the ranks of block `rank` of x (block s: counts[s] elements), a new array."""
    p, r = comm.Get_size(), comm.Get_rank()
    part = _parts(counts)
    acc = x.copy()
    nxt, prv = (r + 1) % p, (r - 1) % p
    recv = np.empty(max(counts, default=0), x.dtype)
    for t in range(p - 1):
        out, inc = (r - t - 1) % p, (r - t - 2) % p
        got = recv[:counts[inc]]
        comm.Sendrecv(moved(np.ascontiguousarray(acc[part[out]])), dest=nxt, recvbuf=moved(got),
                      source=prv)
        acc[part[inc]] += got
    return acc[part[r]].copy()


def ring_all_gather(comm, piece: np.ndarray, counts: list[int], out: np.ndarray) -> None:
    """out (the whole buffer) <- every rank's piece in rank order (block s: counts[s])."""
    p, r = comm.Get_size(), comm.Get_rank()
    part = _parts(counts)
    out[part[r]] = piece
    nxt, prv = (r + 1) % p, (r - 1) % p
    for t in range(p - 1):
        send, inc = (r - t) % p, (r - t - 1) % p
        got = np.empty(counts[inc], out.dtype)
        comm.Sendrecv(moved(np.ascontiguousarray(out[part[send]])), dest=nxt,
                      recvbuf=moved(got), source=prv)
        out[part[inc]] = got


def ring_allreduce(comm, x: np.ndarray) -> None:
    """x <- the sum of x over the ranks (in place): ring reduce-scatter, then all-gather."""
    counts, _ = blocks(len(x), comm.Get_size())
    ring_all_gather(comm, ring_reduce_scatter(comm, x, counts), counts, x)


def in_order_tree(p: int) -> dict[int, tuple[int | None, list[int]]]:
    """{rank: (parent, children)} of the in-order binary tree on ranks 0..p-1 (module
    docstring): position i = r + 1 of height h has children i -/+ 2^(h-1), the right one
    moved down the left spine of its subtree while it lies beyond p."""
    children = {}
    for i in range(1, p + 1):
        h = (i & -i).bit_length() - 1                   # trailing zero bits
        kids = []
        if h:
            step = 1 << (h - 1)
            kids.append(i - step)
            while step and i + step > p:
                step //= 2
            if step:
                kids.append(i + step)
        children[i] = kids
    parent = {c: i for i, kids in children.items() for c in kids}
    return {i - 1: (parent[i] - 1 if i in parent else None, [c - 1 for c in kids])
            for i, kids in children.items()}


def double_trees(p: int) -> list[dict[int, tuple[int | None, list[int]]]]:
    """The two trees; every rank is interior in at most one of them."""
    first = in_order_tree(p)
    move = (lambda r: p - 1 - r) if p % 2 == 0 else (lambda r: (r + 1) % p)   # noqa: E731
    second = {move(r): (None if parent is None else move(parent), [move(c) for c in kids])
              for r, (parent, kids) in first.items()}
    return [first, second]


def tree_allreduce(comm, x: np.ndarray, chunks: int = 4) -> None:
    """x <- the sum of x over the ranks (in place): half of x up and down each of the two
    trees, in `chunks` pieces each, the reductions of later pieces overlapping the broadcasts
    of earlier ones (module docstring). A node adds its children's sums to its own in the
    order left, right."""
    from mpi4py import MPI
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    halves = (x[:len(x) // 2], x[len(x) // 2:])
    links = [tree[r] for tree in double_trees(p)]
    pieces = [np.array_split(np.arange(len(h)), chunks) for h in halves]
    view = lambda t, c: halves[t][pieces[t][c][0]:pieces[t][c][-1] + 1] \
        if len(pieces[t][c]) else halves[t][:0]                   # noqa: E731
    sends, down = [], {}
    for c in range(chunks):                              # broadcasts: posted at once
        for t, (parent, _) in enumerate(links):
            if parent is not None:
                buf = np.empty_like(view(t, c))
                down[(t, c)] = (comm.Irecv(moved(buf), source=parent, tag=4 * c + 2 + t), buf)
    forwarded = set()

    def forward(t, c):                                   # a final chunk: store it, pass it on
        parent, kids = links[t]
        if parent is not None:
            req, buf = down[(t, c)]
            req.Wait()
            view(t, c)[...] = buf
        sends.extend(comm.Isend(moved(view(t, c)), dest=k, tag=4 * c + 2 + t) for k in kids)
        forwarded.add((t, c))

    for c in range(chunks):
        for t, (parent, kids) in enumerate(links):       # up: own + left + right
            mine = view(t, c)
            for k in kids:
                got = np.empty_like(mine)
                comm.Recv(moved(got), source=k, tag=4 * c + t)
                mine += got
            if parent is None:
                forward(t, c)                            # the root's sum is the result
            else:
                req = comm.Isend(moved(mine), dest=parent, tag=4 * c + t)
                req.Wait()           # mine is overwritten by the broadcast; small on a node
        for key in sorted(down):                         # forward what has come down already
            if key not in forwarded and key[1] <= c and down[key][0].Test():
                forward(*key)
    for t in range(2):
        for c in range(chunks):
            if (t, c) not in forwarded:
                forward(t, c)
    MPI.Request.Waitall(sends)


class Hierarchical:
    """The hierarchical all-reduce over comm (module docstring): a shared-memory window of
    q rows per node, grown to the largest buffer seen; free() gives it back (collective)."""

    def __init__(self, comm, node_comm=None):
        """node_comm: comm's ranks that share memory (default: MPI_COMM_TYPE_SHARED; tests
        pass smaller groups to act as several nodes)."""
        from mpi4py import MPI
        self.comm, self.own_node = comm, node_comm is None
        self.node = node_comm if node_comm is not None else comm.Split_type(
            MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.q, self.me = self.node.Get_size(), self.node.Get_rank()
        self.leaders = comm.Split(0 if self.me == 0 else MPI.UNDEFINED, comm.Get_rank())
        self.window, self.rows = None, None

    def _rows(self, n: int, dtype) -> np.ndarray:
        """A q x n view of the node's window (made again when too small or of another type)."""
        from mpi4py import MPI
        if self.rows is None or self.rows.shape[1] < n or self.rows.dtype != dtype:
            self.free()
            size = self.q * n * dtype.itemsize
            self.window = MPI.Win.Allocate_shared(size if self.me == 0 else 0, dtype.itemsize,
                                                  comm=self.node)
            self.window.Lock_all(MPI.MODE_NOCHECK)
            buf = self.window.Shared_query(0)[0]
            self.rows = np.frombuffer(buf, dtype).reshape(self.q, n)
        return self.rows[:, :n]

    def _sync(self) -> None:
        """Memory barrier, node barrier, memory barrier (MPI-3's unified model)."""
        self.window.Sync()
        self.node.Barrier()
        self.window.Sync()

    def __call__(self, x: np.ndarray) -> None:
        from mpi4py import MPI
        rows = self._rows(len(x), x.dtype)
        rows[self.me] = x
        self._sync()
        counts, displs = blocks(len(x), self.q)          # this rank's columns
        lo, hi = displs[self.me], displs[self.me] + counts[self.me]
        sum_rows(rows, lo, hi, rows[0, lo:hi])          # rows 0, 1, .., q-1 in order
        self._sync()
        if self.leaders != MPI.COMM_NULL and self.leaders.Get_size() > 1:
            self.leaders.Allreduce(MPI.IN_PLACE, moved(rows[0]), op=sum_op(x.dtype))
        self._sync()
        x[...] = rows[0]
        self._sync()                                     # row 0 read before it is reused

    def free(self) -> None:
        """Give back the window (collective over the node)."""
        if self.window is not None:
            self.rows = None
            self.window.Unlock_all()
            self.window.Free()
            self.window = None

    def close(self) -> None:
        """The window and the communicators made here (collective over comm)."""
        from mpi4py import MPI
        self.free()
        if self.leaders != MPI.COMM_NULL:
            self.leaders.Free()
        if self.own_node:
            self.node.Free()


class Allreduce:
    """The DP gradient sum by one of ALGORITHMS, as a callable (comm, buffer) that sums the
    buffer over comm in place; "mpi" is MPI_Allreduce (the MPI library's tuned algorithm)."""

    def __init__(self, algorithm: str = "mpi"):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}")
        self.algorithm, self.hierarchies = algorithm, {}

    def __call__(self, comm, x: np.ndarray) -> None:
        from mpi4py import MPI
        if self.algorithm == "mpi":
            comm.Allreduce(MPI.IN_PLACE, moved(x), op=sum_op(x.dtype))
        elif self.algorithm == "ring":
            ring_allreduce(comm, x)
        elif self.algorithm == "tree":
            tree_allreduce(comm, x)
        else:
            if id(comm) not in self.hierarchies:
                self.hierarchies[id(comm)] = Hierarchical(comm)
            self.hierarchies[id(comm)](x)

    def free(self) -> None:
        """Give back the hierarchical path's windows and communicators (collective over each
        group)."""
        for h in self.hierarchies.values():
            h.close()
        self.hierarchies = {}
