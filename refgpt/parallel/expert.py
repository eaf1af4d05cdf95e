"""Expert parallelism: a MoE layer's E experts split over an expert-parallel (EP) group of e
data-parallel ranks (refgpt.parallel.grid), E / e consecutive experts each; every rank
routes its own tokens (refgpt.nn.moe) and the tokens travel to the experts and back by
all-to-all (Lepikhin et al. 2020, GShard; Fedus et al. 2021, Switch Transformer):

    plan        n_e: rows this rank sends to expert e (its kept tokens for e), exchanged by
                MPI_Alltoall first, so rank r learns R[s, j]: the rows source s sends to r's
                j-th expert
    dispatch    MPI_Alltoallv of the rows, grouped by destination in expert order; expert j
                of rank r then runs once on the rows of every source, in source order
    combine     the experts' outputs back by the reverse MPI_Alltoallv, to the ranks and rows
                they came from

Backward reuses the plan: the gate-weighted output gradients go out as the inputs did
(dispatch) and the experts' input gradients come back as the outputs did (combine). The
layer's result is the single process's: each token's output is the same sum of its experts'
outputs, in expert order; an expert's weight gradient sums its rows in one GEMM here and
over micro-batches and ranks there (the same terms, another order).

Each rank's experts' gradients are summed over the expert-data-parallel group (the d / e
ranks holding the same experts: refgpt.parallel.data.GradAllReduce takes its group per
parameter); the router and every other parameter over the whole DP group.

Volume: each all-to-all moves, from a rank, the rows it sends to experts of other ranks,
sum over e not on this rank of n_e times C elements (16-bit rows as their bytes); a layer's
forward and backward make four (``volume``, per layer, counts them; a test compares them with
this formula from the routing). With balanced routing, e ranks and k experts a token, that is
about (e - 1) / e N k C per all-to-all.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..backend import to_device, to_host
from .wire import moved


def expert_of(name: str) -> int | None:
    """The expert a parameter belongs to (h.{i}.mlp.experts.{e}.*), else None."""
    parts = name.split(".")
    if "experts" in parts:
        return int(parts[parts.index("experts") + 1])
    return None


@dataclass
class Plan:
    """One micro-batch's exchange in one layer: sent[e] rows to each expert e (all E, in
    expert order), recv[s, j] rows from source s for this rank's j-th expert."""
    sent: np.ndarray
    recv: np.ndarray


class ExpertComm:
    """The EP group of one rank, and the all-to-alls of its MoE layers."""

    def __init__(self, comm, num_experts: int):
        self.comm, self.size, self.rank = comm, comm.Get_size(), comm.Get_rank()
        self.per_rank = num_experts // self.size
        self.local = range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        self.volume: dict[tuple[str, str], float] = defaultdict(float)
        self.seconds = 0.0               # spent in this group's all-to-alls (benchmarks read it)

    def holds(self, name: str) -> bool:
        """Whether this rank holds a parameter: any that is not an expert's, and its experts'."""
        e = expert_of(name)
        return e is None or e in self.local

    def plan(self, sent: list[int]) -> Plan:
        send = np.asarray(sent, np.int64).reshape(self.size, self.per_rank)
        recv = np.empty_like(send)
        t0 = time.perf_counter()
        self.comm.Alltoall(send, recv)
        self.seconds += time.perf_counter() - t0
        return Plan(send.reshape(-1), recv)

    def dispatch(self, plan: Plan, rows: list, site: str) -> list:
        """rows[e] [sent_e, C] for every expert e -> for each of this rank's experts, the rows
        every source sends it, concatenated in source order."""
        blocks = self._exchange(rows, plan.sent.reshape(self.size, -1).sum(axis=1),
                                plan.recv.sum(axis=1), site)
        per_source = [np.split(b, np.cumsum(plan.recv[s])[:-1]) for s, b in enumerate(blocks)]
        return [_concat([per_source[s][j] for s in range(self.size)], rows[0])
                for j in range(self.per_rank)]

    def combine(self, plan: Plan, outputs: list, site: str) -> list:
        """outputs[j] (this rank's j-th expert's rows, in dispatch's order) -> for every expert
        e, the rows of this rank's tokens it computed, [sent_e, C]."""
        cut = [np.split(o, np.cumsum(plan.recv[:, j])[:-1]) for j, o in enumerate(outputs)]
        to_source = [cut[j][s] for s in range(self.size) for j in range(self.per_rank)]
        blocks = self._exchange(to_source, plan.recv.sum(axis=1),
                                plan.sent.reshape(self.size, -1).sum(axis=1), site)
        out = []
        for j, b in enumerate(blocks):
            out += np.split(b, np.cumsum(plan.sent[j * self.per_rank:(j + 1) * self.per_rank])[:-1])
        return out

    def _exchange(self, pieces: list, send_rows, recv_rows, site: str) -> list:
        """MPI_Alltoallv of row blocks: pieces in destination order, send_rows[j] rows to
        rank j; returns the blocks received from each source."""
        like = pieces[0]
        C = like.shape[-1]
        send = np.ascontiguousarray(to_host(_concat(pieces, like)))
        recv = np.empty((int(recv_rows.sum()), C), send.dtype)
        sc, rc = [int(n) * C for n in send_rows], [int(n) * C for n in recv_rows]
        sd, rd = np.cumsum([0] + sc[:-1]).tolist(), np.cumsum([0] + rc[:-1]).tolist()
        t0 = time.perf_counter()
        self.comm.Alltoallv([moved(send), (sc, sd)], [moved(recv), (rc, rd)])
        self.seconds += time.perf_counter() - t0
        self.volume[(site, "all-to-all")] += sum(sc) - sc[self.rank]
        recv = to_device(recv)
        return np.split(recv, np.cumsum(recv_rows)[:-1].tolist())


def _concat(blocks: list, like):
    """The blocks' rows one after another ([0, C] of like's type when there are none)."""
    blocks = [b for b in blocks if b.shape[0]]
    if not blocks:
        return like[:0]
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
