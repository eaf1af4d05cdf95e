"""The real communicators of every layout that fits this run's world size."""

import pytest

from refgpt.parallel.grid import Grid, groups


@pytest.mark.mpi
def test_communicators_match_the_closed_form():
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    n, me = world.size, world.rank
    for tp in range(1, n + 1):
        for pp in range(1, n + 1):
            if n % (tp * pp):
                continue
            g = Grid(world, tp, pp)
            expected = groups(n, tp, pp)
            for kind, comm, coord in (("tp", g.tp_comm, g.tp_rank), ("dp", g.dp_comm, g.dp_rank),
                                      ("pp", g.pp_comm, g.pp_rank), ("mp", g.mp_comm, None)):
                members = comm.allgather(me)
                assert members in expected[kind], (tp, pp, kind, members)
                if coord is not None:
                    assert comm.rank == coord
            assert g.tp_rank + tp * (g.dp_rank + g.dp_size * g.pp_rank) == me
            stages = g.pp_comm.allgather(me)                # collective: outside any branch
            assert g.pp_next == (stages[g.pp_rank + 1] if g.pp_rank + 1 < pp else None)
            assert g.pp_prev == (stages[g.pp_rank - 1] if g.pp_rank > 0 else None)
