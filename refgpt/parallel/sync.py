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

and reads ``comm_bytes`` (bytes sent or received so far) and ``blocked_s`` (seconds ``ready``
waited for the network in this step). Implementations:

    LocalGrads            one replica (no data parallelism): nothing to sum (here)
    GradAllReduce         bucketed all-reduce, overlapped with backward (refgpt.parallel.data)
    ZeroParams            ZeRO 1-3: reduce-scatter of units into shards (refgpt.parallel.zero)
    SharedParams          ZeRO-1 through a node's shared memory (refgpt.parallel.shared)
"""

from __future__ import annotations

from ..optim.clip import sum_squares


class GradSync:
    """The interface, with what a scheme that moves nothing does."""

    reduces_every_micro_batch = False
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
