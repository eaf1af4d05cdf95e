"""The process grid: COMM_WORLD split into tensor-, data- and pipeline-parallel groups.

world = t * d * p ranks. Rank order: TP innermost (consecutive ranks, so a TP group sits on
one node), then DP, then PP:

    rank = tp + t * (dp + d * pp)          tp in [0, t), dp in [0, d), pp in [0, p)

Worked example, 16 ranks with t = 2, p = 4 (so d = 2):

    TP groups  [0 1] [2 3] [4 5] ... [14 15]              ranks that share a layer's shards
    DP groups  [0 2] [1 3] [4 6] [5 7] ... [13 15]        same shard, different data
    PP groups  [0 4 8 12] [1 5 9 13] [2 6 10 14] [3 7 11 15]   one stage each, in order
    MP groups  [0 1 4 5 8 9 12 13] [2 3 6 7 10 11 14 15]  one whole model replica (grad norm)
    EMB groups [0 12] [1 13] [2 14] [3 15]                first and last stage (tied wte)

Expert parallelism (refgpt.parallel.expert) carves two more groups out of each DP group of d
ranks, for e dividing d: EP groups of e consecutive DP ranks, which hold different experts
and exchange tokens, and expert-DP groups of the d/e ranks that hold the same experts, over
which those experts' gradients are summed (every other gradient is summed over the whole DP
group). With 8 ranks of t = 1, p = 1 (d = 8) and e = 4:

    EP groups         [0 1 2 3] [4 5 6 7]             experts 0-1 on 0 and 4, 2-3 on 1 and 5, ...
    expert-DP groups  [0 4] [1 5] [2 6] [3 7]

Context parallelism (refgpt.parallel.context) carves CP groups of c consecutive DP ranks out
of each DP group in the same way (Megatron's order: TP, then CP, then DP): the c ranks of a
CP group hold different tokens of the same samples, so the d / c groups are the data
replicas (``data_rank``, ``data_size``: which samples a rank reads), while gradients are still
summed over the whole DP group of d ranks (Megatron's DP x CP group). With 8 ranks of t = 2,
p = 1 (d = 4) and c = 2:

    CP groups         [0 2] [1 3] [4 6] [5 7]         tokens split, same samples
    data replicas     DP ranks {0, 1} read samples 0..G/2-1, {2, 3} the rest

Each communicator is made with one Comm.Split whose colour names the group and whose key is
the rank's coordinate along it, so a rank's rank in tp_comm is its tp coordinate, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class Coords:
    tp: int
    dp: int
    pp: int


def coords(rank: int, tp: int, dp: int) -> Coords:
    return Coords(rank % tp, (rank // tp) % dp, rank // (tp * dp))


def groups(world: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Closed-form membership of every group (what the Splits must produce), for tests/docs."""
    dp = world // (tp * pp)
    rank = lambda t, d, p: t + tp * (d + dp * p)  # noqa: E731
    return {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }


def check_sizes(world: int, tp: int, pp: int) -> int:
    """The data-parallel size, or a ConfigError saying why the layout is impossible."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp and --pp must be >= 1, got {tp} and {pp}")
    if world % (tp * pp):
        raise ConfigError(f"the world size {world} is not divisible by --tp {tp} x --pp {pp}")
    return world // (tp * pp)


def check_expert_size(ep: int, dp: int) -> None:
    """A ConfigError unless EP groups of ep ranks can be carved out of dp DP ranks."""
    if ep < 1:
        raise ConfigError(f"--expert-model-parallel-size must be >= 1, got {ep}")
    if dp % ep:
        raise ConfigError(f"--expert-model-parallel-size {ep} does not divide the "
                          f"data-parallel size {dp}")


def check_context_size(cp: int, dp: int) -> None:
    """A ConfigError unless CP groups of cp ranks can be carved out of dp DP ranks."""
    if cp < 1:
        raise ConfigError(f"--context-parallel-size must be >= 1, got {cp}")
    if dp % cp:
        raise ConfigError(f"--context-parallel-size {cp} does not divide the ranks left "
                          f"for data parallelism ({dp} = world / (tp x pp))")


class Grid:
    """This rank's coordinates and communicators. ``Grid(None)`` is the single process
    (every size 1, no communicator and no MPI needed)."""

    def __init__(self, world_comm=None, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1):
        self.world = world_comm
        self.world_size = 1 if world_comm is None else world_comm.Get_size()
        self.rank = 0 if world_comm is None else world_comm.Get_rank()
        self.tp_size, self.pp_size = tp, pp
        self.dp_size = check_sizes(self.world_size, tp, pp)
        c = coords(self.rank, tp, self.dp_size)
        self.tp_rank, self.dp_rank, self.pp_rank = c.tp, c.dp, c.pp
        self.tp_comm = self.dp_comm = self.pp_comm = self.mp_comm = self.emb_comm = None
        check_expert_size(ep, self.dp_size)
        self.ep_size, self.ep_rank, self.edp_rank = ep, c.dp % ep, c.dp // ep
        self.ep_comm = self.edp_comm = self.cp_comm = None
        check_context_size(cp, self.dp_size)
        self.cp_size, self.cp_rank = cp, c.dp % cp
        self.data_size, self.data_rank = self.dp_size // cp, c.dp // cp
        if world_comm is not None:
            from mpi4py import MPI
            t, d, p = tp, self.dp_size, pp
            self.tp_comm = world_comm.Split(color=c.dp + d * c.pp, key=c.tp)
            self.dp_comm = world_comm.Split(color=c.tp + t * c.pp, key=c.dp)
            self.pp_comm = world_comm.Split(color=c.tp + t * c.dp, key=c.pp)
            self.mp_comm = world_comm.Split(color=c.dp, key=c.tp + t * c.pp)
            ends = p > 1 and c.pp in (0, p - 1)    # the two holders of the tied token table
            emb = world_comm.Split(color=c.tp + t * c.dp if ends else MPI.UNDEFINED, key=c.pp)
            self.emb_comm = emb if emb != MPI.COMM_NULL else None
            if cp > 1:
                self.cp_comm = self.dp_comm.Split(color=c.dp // cp, key=c.dp % cp)
            if ep > 1:
                self.ep_comm = self.dp_comm.Split(color=self.edp_rank, key=self.ep_rank)
                self.edp_comm = self.dp_comm.Split(color=self.ep_rank, key=self.edp_rank)

    def free(self) -> None:
        """Free the communicators made here (collective over the world). An MPI process has a
        few thousand of them (MPICH: 2048), so a process that builds many grids, as the test
        suite does, gives each back when done."""
        names = ("cp_comm", "ep_comm", "edp_comm", "emb_comm", "mp_comm", "pp_comm", "dp_comm",
                 "tp_comm")
        for name in names:
            comm = getattr(self, name)
            if comm is not None:
                comm.Free()
                setattr(self, name, None)

    def replica_rank(self, expert: bool) -> int:
        """This rank's index among the ranks holding the same copy of a parameter: its DP
        rank, or for an expert's parameter under expert parallelism its expert-DP rank."""
        return self.edp_rank if expert and self.ep_size > 1 else self.dp_rank

    @property
    def pp_prev(self) -> int | None:
        """World rank of the previous pipeline stage (None on the first)."""
        return None if self.pp_rank == 0 else self.rank - self.tp_size * self.dp_size

    @property
    def pp_next(self) -> int | None:
        return None if self.pp_rank == self.pp_size - 1 else self.rank + self.tp_size * self.dp_size

    def describe(self) -> str:
        return (f"{self.world_size} ranks = tp {self.tp_size} x dp {self.dp_size} x "
                f"pp {self.pp_size}" + (f" (ep {self.ep_size} within dp)" if self.ep_size > 1
                                        else "")
                + (f" (cp {self.cp_size} within dp: {self.data_size} data "
                   f"replica{'s' * (self.data_size > 1)})" if self.cp_size > 1 else ""))
