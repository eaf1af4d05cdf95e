"""Measuring the study's configurations inside one MPI job.

Configurations run one after another. For one of R ranks, ``world.Split`` makes a
sub-communicator of world ranks 0..R-1 (so with ranks placed in blocks, the fewest nodes); the
Trainer runs on it exactly as ``python -m refgpt.train`` would on R processes (R = 1: the plain
single-process path), and the other ranks wait in ``quiet_barrier``, which sleeps between polls
instead of spinning on a core the measured ranks may need. Bind ranks to cores (Open MPI:
``--bind-to core``; Slurm: ``srun --cpu-bind=cores``): unbound, the measured ranks are moved
between cores whenever a waiting one wakes.

Each iteration starts after a barrier, so iterations do not overlap across ranks; its time is
the slowest rank's. Phase times (forward, backward, exposed all-reduce, optimizer, pipeline
bubble) are each rank's timers (refgpt.timers, no barriers inside the step), averaged over the
ranks. Two GEMM rates put the FLOP/s in context: one core alone (measured once, by rank 0 while
the others sleep) and the rate per core while all R ranks multiply at once (each Trainer
measures its rate at start-up), which shows what shared memory bandwidth and clock limits
leave of the lone core's peak.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from dataclasses import replace

import numpy as np

from ..config import ModelConfig
from ..engine import Trainer
from ..engine.report import peak_rss
from ..metrics import measure_gemm_rate, megatron_flops, model_flops
from ..parallel.grid import Grid
from ..parallel.launch import quiet_barrier
from ..timers import NAMES
from ..precision import compute_dtype, dtype_of
from .plan import Config, parallel_config


def core_gemm_rate(dtype) -> float:
    """FLOP/s of one core alone: the GEMM rate with one BLAS thread."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1):
        return measure_gemm_rate(dtype_of(dtype))


def group_rates(world, elements: int, bucket: int, dtype, overlap: bool,
                sizes=None) -> dict[int, float]:
    """{n: bytes a second a rank moves} in the bucketed all-reduce of a gradient, for every
    group size n > 1 dividing the world (or those of `sizes`): consecutive ranks in groups of
    n, every group summing at once (as a layout's data-parallel groups do), each rank's share
    of the model's `elements` (the model split over world / n ranks) in buckets of `bucket`
    elements, the way refgpt.parallel.data sums them: non-blocking MPI_Iallreduce with
    IN_FLIGHT left running (overlap, the default; MPIs run these slower than their tuned
    blocking algorithms), or blocking MPI_Allreduce (--no-overlap-grad-reduce); the best of
    three, the slowest rank's. The gradients' type: fp32 in a 16-bit run
    (refgpt.precision)."""
    from mpi4py import MPI

    from ..parallel.data import IN_FLIGHT
    out = {}
    for n in sizes or (k for k in range(2, world.size + 1) if world.size % k == 0):
        group = world.Split(world.rank // n, world.rank)
        buf = np.ones(max(elements * n // world.size, 1), compute_dtype(dtype_of(dtype)))
        step = bucket or buf.size
        best = float("inf")
        for _ in range(3):
            world.Barrier()
            start, pending = time.perf_counter(), []
            for lo in range(0, buf.size, step):
                if overlap:
                    pending.append(group.Iallreduce(MPI.IN_PLACE, buf[lo:lo + step]))
                    if len(pending) > IN_FLIGHT:
                        pending.pop(0).Wait()
                else:
                    group.Allreduce(MPI.IN_PLACE, buf[lo:lo + step])
            MPI.Request.Waitall(pending)
            best = min(best, world.allreduce(time.perf_counter() - start, op=MPI.MAX))
        group.Free()
        out[n] = 2 * (n - 1) / n * buf.nbytes / best
    return out


def timed(world, work, repeats: int = 3) -> float:
    """Seconds `work()` takes on every rank of `world` at once: the median of `repeats` runs
    after a first (which compiles and warms), each started by a barrier, each the slowest
    rank's."""
    from mpi4py import MPI
    spent = []
    for run in range(repeats + 1):
        world.Barrier()
        start = time.perf_counter()
        work()
        if run:
            spent.append(world.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return float(np.median(spent))


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(world) -> dict:
    """What the numbers were measured on."""
    cpu = cpu_name()
    mpi = "none (one process)"
    if world is not None:
        from mpi4py import MPI
        mpi = MPI.Get_library_version().strip("\x00 \n").splitlines()[0]
    nodes = 1 if world is None else len(set(world.allgather(platform.node())))
    return {"cpu": cpu, "cores_per_node": os.cpu_count(), "nodes": nodes, "mpi": mpi,
            "python": platform.python_version(), "numpy": np.__version__}


def run_config(world, cfg: Config, base, warmup: int, iters: int, say) -> dict | None:
    """Measure one configuration on world ranks 0..R-1; the result on world rank 0, None on
    the others. base: (ModelConfig, TrainConfig, ParallelConfig, flags given)."""
    sub = None
    if world is not None:
        from mpi4py import MPI
        rank = world.Get_rank()
        sub = world.Split(0 if rank < cfg.ranks else MPI.UNDEFINED, rank)
        if sub == MPI.COMM_NULL:
            quiet_barrier(world)
            return None
    try:
        result = _measure(sub if cfg.ranks > 1 else None, cfg, base, warmup, iters, say)
    finally:
        if sub is not None:
            sub.Free()
        gc.collect()
    quiet_barrier(world)
    return result


def _measure(comm, cfg: Config, base, warmup: int, iters: int, say) -> dict | None:
    mcfg, tcfg, pcfg, given = base
    mcfg = ModelConfig.from_dict(mcfg.to_dict())            # the Trainer may set the vocabulary
    tcfg = replace(tcfg, train_iters=warmup + iters)
    lay = cfg.layout
    trainer = Trainer(mcfg, tcfg, parallel_config(pcfg, lay), Grid(comm, lay.tp, lay.pp), given,
                      log=lambda *a, **k: None)
    R, n = cfg.ranks, warmup + iters
    rank = 0 if comm is None else comm.Get_rank()
    times, phases, losses, traffic = np.zeros(n), np.zeros((n, len(NAMES))), [], np.zeros(n)
    for i in range(n):
        if comm is not None:
            comm.Barrier()
        r = trainer.train_step()
        taken = trainer.timers.take()
        times[i], traffic[i] = r["step_time_s"], r["dp_comm_bytes"]
        phases[i] = [taken[name] for name in NAMES]
        losses.append(r["loss"])
        if rank == 0:
            say(f"    iteration {i + 1}/{n}{' (warm-up)' if i < warmup else ''}: "
                f"{r['step_time_s']:.3f} s, loss {r['loss']:.6f}")
    gemm = trainer.gemm_rate / pcfg.threads_per_rank        # the study requires >= 1
    rss = peak_rss()
    if comm is not None:
        from mpi4py import MPI
        comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
        comm.Allreduce(MPI.IN_PLACE, traffic, op=MPI.MAX)
        comm.Allreduce(MPI.IN_PLACE, phases, op=MPI.SUM)
        phases /= R
        gemm = comm.allreduce(gemm) / R
        rss = comm.allreduce(rss, op=MPI.MAX)
    trainer.close()
    del trainer
    if rank != 0:
        return None
    measured = slice(warmup, n)
    G, T = tcfg.global_batch_size, mcfg.seq_length
    return {"key": cfg.key, "ranks": R, "layout": lay.name, "dp": cfg.dp, "tp": lay.tp,
            "pp": lay.pp, "micro_batch": tcfg.micro_batch_size,
            "accumulation": cfg.micro_batches, "global_batch": G, "seq_length": T,
            "threads_per_rank": pcfg.threads_per_rank, "warmup": warmup, "iters": iters,
            "iter_s": float(times[measured].mean()),
            "iter_s_all": times.tolist(),
            "phases_s": dict(zip(NAMES, phases[measured].mean(axis=0).tolist())),
            "losses": losses,
            "megatron_flops": megatron_flops(G, T, mcfg.num_layers, mcfg.hidden_size,
                                             mcfg.padded_vocab),
            "model_flops": model_flops(mcfg, G),
            "gemm_loaded_per_core": gemm,
            "dp_comm_bytes": float(traffic[measured].mean()),
            "peak_rss": rss}
