"""Gradient synchronisation: how a rank's gradients become the step's gradient, one interface
for every data-parallel scheme.

The engine calls, in a step:

    start()               before a backward whose gradients are to be reduced (the last
                          micro-batch's; every micro-batch's where reduces_every_micro_batch)
    ready(names)          during that backward, as the model finishes these parameters'
                          gradients (refgpt.nn.gpt: GPT.backward's on_ready), so reductions
                          can start while backward goes on
    finish()              after it: every reduction done; the gradient the optimizer reads is
                          complete (all of it, or this rank's shard)
    after_step()          after the optimizer: every rank can read the updated parameters
    grad_squares(counted) this rank's share of the squared global gradient norm: the sum over
                          the gradient elements it owns, of the parameters counted(name), so
                          that summed over all ranks every element of the model counts once

and reads ``comm_bytes`` (bytes sent or received so far), ``blocked_s`` (seconds ``ready``
waited for the network in this step) and ``exact_norm`` (whether grad_squares gives the
step's gradient's norm, which clipping then uses; False: an estimate, logged, not clipped
by). Implementations:

    LocalGrads            one replica (no data parallelism): nothing to sum (here)
    GradAllReduce         bucketed all-reduce, overlapped with backward (refgpt.parallel.data)
    ZeroParams            ZeRO 1-3: reduce-scatter of units into shards (refgpt.parallel.zero)
    SharedParams          ZeRO-1 through a node's shared memory (refgpt.parallel.shared)
    OnebitGrads           1-bit Adam's: an all-reduce during its warm-up, then none (here)
"""

from __future__ import annotations

from ..optim.clip import sum_squares


class GradSync:
    """The interface, with what a scheme that moves nothing does."""

    reduces_every_micro_batch = False
    exact_norm = True
    comm_bytes = 0.0
    blocked_s = 0.0
    buckets: tuple = ()              # an all-reduce's buckets (the banner counts them)

    def start(self) -> None:
        pass

    def ready(self, names) -> None:
        pass

    def finish(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def grad_squares(self, counted) -> float:
        raise NotImplementedError

    def free(self) -> None:
        """Give back memory shared between processes (collective; most hold none)."""


class LocalGrads(GradSync):
    """One replica: the local gradient is the step's gradient."""

    def __init__(self, params):
        self.params = params

    def grad_squares(self, counted) -> float:
        return squares(self.params, counted)


def squares(params, counted) -> float:
    """sum(g^2) over the parameters counted(name) (over the whole buffer when all are)."""
    names = [n for n in params.slices if counted(n)]
    if len(names) == len(params.slices):
        return sum_squares(params.grad)
    return sum(sum_squares(params.grads[n]) for n in names)


class OnebitGrads(GradSync):
    """1-bit Adam's gradient sync (refgpt.optim.onebit): the data-parallel sum of ``inner``
    during the optimizer's warm-up; afterwards none, the gradient staying on its worker (the
    optimizer averages the momenta instead, 1-bit compressed). Its traffic counts in
    comm_bytes. Past the warm-up the norm the engine logs is the root mean square over the d
    workers of ||d g_i||, worker i's estimate of the whole gradient: each rank gives
    d ||g_i||^2 of what it counts (summed over the world, d^2 ||g_i||^2 / d per worker). It
    is not clipped by: each estimate carries its worker's sampling noise, d times the global
    batch's variance, so it overstates the gradient's norm and clipping by it would shrink
    every step (measured: docs/collectives.md)."""

    def __init__(self, inner: GradSync, params, opt):
        self.inner, self.params, self.opt = inner, params, opt
        self.buckets = inner.buckets

    @property
    def comm_bytes(self) -> float:
        return self.inner.comm_bytes + self.opt.sent_bytes

    @property
    def blocked_s(self) -> float:
        return 0.0 if self.opt.compressing else self.inner.blocked_s

    @property
    def exact_norm(self) -> bool:
        return not self.opt.compressing

    def start(self) -> None:
        if not self.opt.compressing:
            self.inner.start()

    def ready(self, names) -> None:
        if not self.opt.compressing:
            self.inner.ready(names)

    def finish(self) -> None:
        if not self.opt.compressing:
            self.inner.finish()

    def grad_squares(self, counted) -> float:
        if not self.opt.compressing:
            return self.inner.grad_squares(counted)
        return self.opt.workers * squares(self.params, counted)

    def free(self) -> None:
        self.inner.free()
