"""Megatron-style named timers, reported as min/max over ranks.

    timers = Timers(level)
    with timers("forward"):
        ...
    timers.add("pipeline-bubble", seconds)   # a time measured elsewhere
    timers.summary(comm)   # {"forward": (min_s, max_s), ...} since the last summary

Levels (--timing-log-level): 0 no timers; 1 local wall-clock time of each phase, no
synchronisation in the step (the min/max reduction runs only when a summary is logged);
2 also a barrier before each timed phase, so a phase's time excludes waiting for slower ranks
(slower, but attributes load imbalance to the right phase).

With pipeline parallelism forward and backward interleave inside the schedule: the executor
times its compute ops, forward and backward are their sums (zero-bubble W counts as backward),
and "pipeline-bubble" is the rest of the schedule's time (waiting for neighbours, sends).
Inside the schedule the stages run different ops, so those timers never take a barrier.

A timed phase is also where a phase begins: ``on_enter(name)`` is called as each one starts,
at every level (the engine's test-only fault injection hangs there: refgpt.engine.faults).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

NAMES = ("batch-generator", "forward", "backward", "pipeline-bubble", "grads-all-reduce",
         "optimizer")


class Timers:
    def __init__(self, level: int = 1, comm=None, on_enter=None):
        self.level, self.comm, self.on_enter = level, comm, on_enter
        self.elapsed = dict.fromkeys(NAMES, 0.0)

    @contextmanager
    def __call__(self, name: str, barrier: bool = True):
        """Time a phase; barrier=False: never wait for the other ranks (inside a pipeline
        schedule)."""
        if self.on_enter is not None:
            self.on_enter(name)
        if self.level == 0:
            yield
            return
        if barrier and self.level >= 2 and self.comm is not None:
            self.comm.Barrier()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.elapsed[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        if self.level:
            self.elapsed[name] += seconds

    def take(self) -> dict[str, float]:
        """This rank's seconds per timer since the last take or summary; resets."""
        out, self.elapsed = self.elapsed, dict.fromkeys(NAMES, 0.0)
        return out

    def summary(self, comm=None) -> dict[str, tuple[float, float]]:
        """(min, max) over the ranks of comm of each timer since the last summary; resets.
        Collective over comm: every rank must call it at the same iteration."""
        if self.level == 0:
            return {}
        local = np.array(list(self.take().values()))
        lo, hi = local.copy(), local.copy()
        if comm is not None and comm.Get_size() > 1:
            from mpi4py import MPI
            comm.Allreduce(local, lo, op=MPI.MIN)
            comm.Allreduce(local, hi, op=MPI.MAX)
        return {n: (float(a), float(b)) for n, a, b in zip(NAMES, lo, hi)}
