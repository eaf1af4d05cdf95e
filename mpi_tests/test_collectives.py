"""The hand-written collectives (refgpt.parallel.collectives) equal MPI's in float64 at any
world size, for buffers shorter than the rank count, odd, and not divisible by it: the ring
reduce-scatter (uneven counts) and all-gather, the ring, double-binary-tree and hierarchical
all-reduces (the hierarchical one also with the world cut into two pretend nodes, of
unequal sizes on an odd world); and data parallelism trains equal to one process with each
of them as --dp-allreduce-algorithm, run after backward or, with --dp-comm-thread, on a helper
thread during it."""

import numpy as np
import pytest

from refgpt.config import ParallelConfig
from refgpt.engine import Trainer
from refgpt.parallel import collectives as co
from refgpt.parallel.grid import Grid
from test_zero import QUIET, agree, model_cfg, same_run, train_cfg


def sizes(p):
    return sorted({0, 1, max(p - 1, 1), p + 1, 2 * p + 3, 1001})


def close(a, b):
    return a.shape == b.shape and (a.size == 0 or np.abs(a - b).max() <= 1e-14 * max(
        1.0, np.abs(b).max()))


@pytest.mark.mpi(min_size=1)
def test_ring_reduce_scatter_and_all_gather_equal_mpi():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    p, r = comm.size, comm.rank
    ok = True
    for n in sizes(p):
        x = np.random.default_rng(r + 7 * n).standard_normal(n)
        counts, displs = co.blocks(n, p)
        uneven = list(reversed(counts))                  # the longer blocks last
        for c in (counts, uneven):
            want = np.empty(c[r])
            comm.Reduce_scatter(x, want, c)
            ok = ok and close(co.ring_reduce_scatter(comm, x, c), want)
        piece = x[:counts[r]].copy()
        want = np.empty(n)
        comm.Allgatherv(piece, [want, (counts, displs)])
        got = np.empty(n)
        co.ring_all_gather(comm, piece, counts, got)
        ok = ok and np.array_equal(got, want)
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ["ring", "tree", "hierarchical", "hierarchical-2-nodes"])
def test_allreduce_algorithms_equal_mpi(algorithm):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    p, r = comm.size, comm.rank
    if algorithm == "hierarchical-2-nodes":
        node = comm.Split(2 * r // p, r)                  # unequal on an odd world; 1 at p = 1
        run = co.Hierarchical(comm, node)
        reduce, free = (lambda c, x: run(x)), run.free
    else:
        run = co.Allreduce(algorithm)
        reduce, free = run, run.free
    ok = True
    for n in sizes(p):
        x = np.random.default_rng(r + 7 * n).standard_normal(n)
        want = x.copy()
        comm.Allreduce(MPI.IN_PLACE, want)
        reduce(comm, x)
        ok = ok and close(x, want)
    free()
    if algorithm == "hierarchical-2-nodes":
        run.close()
        node.Free()
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm, thread", [("ring", False), ("tree", False),
                                               ("hierarchical", False), ("mpi", True),
                                               ("ring", True), ("hierarchical", True)])
def test_data_parallel_training_with_each_algorithm_equals_one_process(algorithm, thread):
    """thread: the sums on the helper thread as buckets become ready (--dp-comm-thread)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    tcfg = train_cfg(comm.size, 2)
    pcfg = ParallelConfig(dp_allreduce_algorithm=algorithm, ddp_bucket_size=3000,
                          dp_comm_thread=thread)
    par = Trainer(model_cfg(), tcfg, pcfg, Grid(comm), **QUIET)
    ser = Trainer(model_cfg(), tcfg, **QUIET)
    ok = same_run(par, ser, par.run(), ser.run())
    par.close()
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
def test_the_helper_thread_sums_dense_and_expert_groups_as_one_process():
    """--dp-comm-thread with experts over EP 2: buckets of two groups (dense over all the
    data-parallel ranks, experts over their expert-data-parallel group), each summed on its own
    duplicate communicator. On an odd world the even part of it runs (EP 2 needs pairs)."""
    from dataclasses import replace

    from mpi4py import MPI
    world = MPI.COMM_WORLD
    even = world.size - world.size % 2
    comm = world.Split(0 if world.rank < even else MPI.UNDEFINED, world.rank)
    ok = True
    if comm != MPI.COMM_NULL:
        model = replace(model_cfg(), num_experts=4)
        tcfg = train_cfg(comm.size, 2)
        pcfg = ParallelConfig(expert_model_parallel_size=2, dp_comm_thread=True,
                              ddp_bucket_size=2000)
        par = Trainer(model, tcfg, pcfg, Grid(comm, 1, 1, 2), **QUIET)
        ser = Trainer(model, tcfg, **QUIET)
        ok = same_run(par, ser, par.run(), ser.run())
        par.close()
        comm.Free()
    assert agree(world, ok)
