"""1-bit Adam over data parallelism: the compressed all-reduce (refgpt.parallel.compressed)
equals DeepSpeed's compressed_allreduce written out in NumPy, every rank's vectors known to
every rank, over consecutive calls (the errors fed back) and tensors of odd sizes; the
optimizer's multi-worker step equals DeepSpeed's rule on scripted gradients; training in the
warm-up (data and pipeline parallelism) equals one process in float64 (1e-12); past it the
replicas stay equal, the step's traffic is the formula's and 16 or more times below the
all-reduce's, the logged norm is marked an estimate (not clipped by), and a run resumed from
a checkpoint continues with zeroed errors."""

import math
from dataclasses import replace

import numpy as np
import pytest

from refgpt.config import ParallelConfig
from refgpt.engine import Trainer
from refgpt.optim import OnebitAdam
from refgpt.parallel.compressed import CompressedAllreduce
from refgpt.parallel.grid import Grid
from test_zero import QUIET, agree, model_cfg, same_run, train_cfg


def sign(x):
    return np.where(x >= 0, 1.0, -1.0)


class Emulated:
    """DeepSpeed's compressed_allreduce for all d workers at once (their errors kept), one
    tensor at a time: the reference."""

    def __init__(self, d, tensors):
        unit = d * (d * 8 // math.gcd(d, 8))
        self.d, self.tensors = d, tensors
        self.sizes = [-(-(b - a) // unit) * unit for a, b in tensors]
        self.worker = [[np.zeros(n) for n in self.sizes] for _ in range(d)]
        self.server = [[np.zeros(n // d) for n in self.sizes] for _ in range(d)]

    def __call__(self, xs):
        """The result (the same on every worker) of the workers' vectors xs."""
        d, out = self.d, np.zeros_like(xs[0])
        for t, ((a, b), n) in enumerate(zip(self.tensors, self.sizes)):
            c, bufs, scales = n // d, [], []
            for i in range(d):
                buf = np.zeros(n)
                buf[:b - a] = xs[i][a:b]
                buf += self.worker[i][t]
                scales.append(np.linalg.norm(buf) / math.sqrt(n))
                self.worker[i][t] = buf - scales[i] * sign(buf)
                bufs.append(buf)
            full = np.zeros(n)
            for j in range(d):
                comp = sum(scales[i] / d * sign(bufs[i][j * c:(j + 1) * c]) for i in range(d))
                comp = comp + self.server[j][t]
                s = np.linalg.norm(comp) / math.sqrt(c)
                self.server[j][t] = comp - s * sign(comp)
                full[j * c:(j + 1) * c] = s * sign(comp)
            out[a:b] = full[:b - a]
        return out


TENSORS = [(0, 5), (5, 29), (29, 30), (30, 97)]


@pytest.mark.mpi(min_size=2)
def test_the_compressed_allreduce_equals_deepspeeds():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d, r = comm.size, comm.rank
    rng = np.random.default_rng(1)
    xs = [[rng.standard_normal(97) for _ in range(d)] for _ in range(4)]   # per call, worker
    mine, ref = CompressedAllreduce(comm, TENSORS, np.float64), Emulated(d, TENSORS)
    ok = True
    for step in xs:
        x = step[r].copy()
        mine(x)
        want = ref(step)
        ok = ok and np.abs(x - want).max() <= 1e-14 * np.abs(want).max()
    unit = d * (d * 8 // math.gcd(d, 8))
    padded = sum(-(-(b - a) // unit) * unit for a, b in TENSORS)
    per_call = (d - 1) * (2 * padded // d // 8 + 2 * len(TENSORS) * 8)
    ok = ok and mine.sent_bytes == 4 * per_call and mine.padded == padded
    assert agree(comm, ok)


@pytest.mark.mpi(min_size=2)
def test_the_multi_worker_step_equals_deepspeeds_rule():
    """Each worker's own gradients after the warm-up (before it: their sum, as the engine's
    all-reduce gives), the momentum averaged 1-bit, the update DeepSpeed's."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d, r = comm.size, comm.rank
    rng = np.random.default_rng(2)
    n, warmup, lr, b1, b2, eps, wd = 97, 2, 1e-2, 0.9, 0.95, 1e-8, 0.1
    w0 = rng.standard_normal(n)
    local = [[rng.standard_normal(n) / d for _ in range(d)] for _ in range(5)]
    p, g = w0.copy(), np.zeros(n)
    opt = OnebitAdam(p, g, [(5, 29)], warmup, d, CompressedAllreduce(comm, TENSORS, np.float64),
                     betas=(b1, b2), eps=eps, weight_decay=wd)
    ref, w, m, v = Emulated(d, TENSORS), w0.copy(), np.zeros(n), np.zeros(n)
    for t, grads in enumerate(local, start=1):
        g[...] = sum(grads) if t <= warmup else grads[r]
        opt.step(lr)
        if t <= warmup:
            total = sum(grads)
            m = b1 * m + (1 - b1) * total
            v = b2 * v + (1 - b2) * total ** 2
        else:
            m = ref([b1 * m + (1 - b1) * d * gi for gi in grads])
        u = m / (np.sqrt(v) + eps)
        u[5:29] += wd * w[5:29]
        w = w - lr * u
    assert agree(comm, np.abs(p - w).max() <= 1e-13 * np.abs(w).max())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pp", [1, 2])
def test_the_warm_up_trains_equal_to_one_process(pp):
    """On a world not divisible by the stages, the largest part of it that is runs."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    used = world.size - world.size % pp
    comm = world.Split(0 if world.rank < used else MPI.UNDEFINED, world.rank)
    ok = True
    if comm != MPI.COMM_NULL:
        tcfg = replace(train_cfg(comm.size // pp, 2), optimizer="onebit-adam",
                       onebit_warmup_iters=3)
        par = Trainer(model_cfg(), tcfg, ParallelConfig(pipeline_model_parallel_size=pp),
                      Grid(comm, 1, pp), **QUIET)
        ser = Trainer(model_cfg(), tcfg, **QUIET)
        ok = same_run(par, ser, par.run(), ser.run())
        par.close()
        comm.Free()
    assert agree(world, ok)


@pytest.mark.mpi(min_size=2)
def test_past_the_warm_up_the_replicas_agree_and_send_the_formulas_bytes(tmp_path_factory):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    d = comm.size
    folder = comm.bcast(str(tmp_path_factory.mktemp("onebit")) if comm.rank == 0 else None)
    tcfg = replace(train_cfg(d, 2), optimizer="onebit-adam", onebit_warmup_iters=2,
                   train_iters=5, eval_iters=0, save=folder)
    t = Trainer(model_cfg(), tcfg, ParallelConfig(), Grid(comm), **QUIET)
    records = t.run()
    c = t.opt.allreduce
    per_step = (d - 1) * (2 * c.padded // d // 8 + 2 * len(c.tensors) * 8)
    allreduce = 2 * t.model.params.padded * (d - 1) / d * 8
    ok = ([r["dp_comm_bytes"] for r in records[2:]] == [per_step] * 3
          and records[0]["dp_comm_bytes"] == allreduce and allreduce >= 16 * per_step)
    same = comm.allgather(t.opt.p)                            # every replica the same
    ok = ok and all(np.array_equal(x, same[0]) for x in same) and c.worker_error.any()
    ok = ok and not t.sync.exact_norm                         # an estimate: not clipped by
    m, v = t.opt.m.copy(), t.opt.v.copy()
    t.close()
    resumed = Trainer(model_cfg(), replace(tcfg, train_iters=6, load=folder), ParallelConfig(),
                      Grid(comm), **QUIET)
    ok = ok and resumed.opt.t == 5 and np.array_equal(resumed.opt.m, m) \
        and np.array_equal(resumed.opt.v, v) and not resumed.opt.allreduce.worker_error.any()
    resumed.run()
    ok = ok and resumed.opt.t == 6 and resumed.opt.allreduce.worker_error.any()
    resumed.close()
    assert agree(comm, ok)
