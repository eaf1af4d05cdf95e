"""1-bit Adam (Tang et al. 2021, "1-bit Adam: communication efficient large-scale training
with Adam's convergence speed"), with DeepSpeed's update rule (deepspeed's OnebitAdam).

Adam's variance changes slowly once training has settled; frozen, it makes Adam a momentum
SGD with a fixed per-element scale, and momentum tolerates 1-bit compression with error
feedback. So for the first ``warmup`` steps (--onebit-warmup-iters) it is Adam on the
all-reduced gradient g; after them the gradient is not all-reduced at all: each of the d
data-parallel workers folds its own gradient into its momentum, and the momenta are averaged
by the 1-bit all-reduce (refgpt.parallel.compressed, which the engine hands it):

    warm-up      m <- b1 m + (1 - b1) g           v <- b2 v + (1 - b2) g^2
    afterwards   m <- mean_1bit over workers of (b1 m + (1 - b1) d g_i)       v frozen
    both         u  = m / (sqrt(v) + eps)  +  wd w      (wd on the decayed tensors)
                 w <- w - lr u

(g_i: worker i's share of the gradient, which refgpt normalises by the global batch's
tokens, so d g_i estimates g.) As DeepSpeed's rule: no bias correction, and the weight decay
enters the update (L2), not AdamW's separate shrink; with exact sums the two phases' m is the
same. Every worker ends a step with the same m (the all-reduce's result), so the parameters
stay equal on every rank; what differs between workers is their compression errors.

The state a checkpoint keeps is t, m and v (AdamW's names); a resumed run starts its
compression errors at zero, as DeepSpeed resets them when it loads a checkpoint (they are one
buffer per worker, and meaningless under another number of workers). After the warm-up
there is no all-reduced gradient to measure: the engine logs the workers' estimate of its
norm, the root mean square of ||d g_i||, and does not clip by it
(refgpt.parallel.sync.OnebitGrads says why).
"""

from __future__ import annotations

import numpy as np

from .adamw import AdamW


class OnebitAdam(AdamW):
    def __init__(self, params: np.ndarray, grads: np.ndarray, decay: list[tuple[int, int]],
                 warmup: int, workers: int = 1, allreduce=None, **kwargs):
        """warmup: the steps of plain Adam before the variance freezes; workers: d, the
        data-parallel ranks; allreduce(m): the 1-bit mean over them, in place
        (refgpt.parallel.compressed.CompressedAllreduce; None for one worker)."""
        super().__init__(params, grads, decay, **kwargs)
        self.warmup, self.workers, self.allreduce = warmup, workers, allreduce

    @property
    def compressing(self) -> bool:
        """Whether the next step is past the warm-up (its gradient stays on the worker)."""
        return self.t >= self.warmup

    @property
    def extra_bytes(self) -> int:
        """The compression's worker and server errors."""
        return self.allreduce.error_bytes if self.allreduce else 0

    @property
    def sent_bytes(self) -> int:
        return self.allreduce.sent_bytes if self.allreduce else 0

    def step(self, lr: float) -> None:
        compress = self.compressing
        self.t += 1
        p, m, v = self.p, self.m, self.v
        g = self.g.astype(p.dtype, copy=False)
        m *= self.b1
        if compress:
            m += ((1.0 - self.b1) * self.workers) * g
            if self.allreduce is not None:
                self.allreduce(m)
        else:
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
        u = np.sqrt(v)                                     # u = m / (sqrt(v) + eps), in place
        u += self.eps
        np.divide(m, u, out=u)
        for a, b in self.decay if self.wd else ():
            u[a:b] += self.wd * p[a:b]
        u *= lr
        p -= u
