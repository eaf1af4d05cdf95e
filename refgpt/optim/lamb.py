"""LAMB (You et al. 2019, "Large batch optimization for deep learning"): AdamW's moments, and
each tensor's step scaled by its trust ratio, so that every layer moves by a fixed fraction
of its own norm however large the global batch (and the learning rate) grows.

For step t, with gradient g, on each parameter tensor w, with AdamW's conventions
(refgpt.optim.adamw: bias corrections, eps outside the square root):

    m <- b1 m + (1 - b1) g                     v <- b2 v + (1 - b2) g^2
    u  = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)  +  wd w   (wd on decayed tensors)
    r  = ||w|| / ||u||     (1 where either norm is 0)
    w <- w - lr r u

The decay enters u (LAMB's "coupled into the update" form, as NVIDIA's FusedLAMB and
DeepSpeed's), not as AdamW's separate shrink. Everything but the two norms is element by
element, so it runs on whatever part of the buffer this rank updates; the norms need whole
tensors. A tensor may be split: over tensor parallelism (each rank a shard of it), and with
ZeRO over data parallelism (each rank the part of the flat buffer it owns). So the rank sums
the squares of w and u over its pieces of each tensor, and ``norms`` (given by the engine,
refgpt.parallel.build.lamb_norms) adds those partial sums over the ranks that share the
tensors, counting a replicated tensor once: every rank then sees the same whole-tensor norms
and ratios. In a 16-bit run MasterLamb updates fp32 master weights (refgpt.optim.mixed).
"""

from __future__ import annotations

import math

import numpy as np

from .adamw import AdamW
from .clip import sum_squares
from .mixed import MasterAdamW


class Lamb(AdamW):
    def __init__(self, params: np.ndarray, grads: np.ndarray, decay: list[tuple[int, int]], *,
                 tensors: list[list[tuple[int, int]]], norms=None, **kwargs):
        """tensors: for every parameter tensor, the (start, stop) pieces of it in this rank's
        buffer (a whole tensor: one piece; none where the rank holds none of it);
        norms(squares): squares [T, 2] (this rank's sums of w^2 and u^2 per tensor) summed
        over the ranks that share the tensors (None: this rank holds them whole)."""
        super().__init__(params, grads, decay, **kwargs)
        self.tensors, self.norms = tensors, norms

    def step(self, lr: float) -> None:
        self.t += 1
        bc1, bc2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        w, m, v = self.p, self.m, self.v
        g = self.g.astype(w.dtype, copy=False)
        m *= self.b1
        m += (1.0 - self.b1) * g
        v *= self.b2
        v += (1.0 - self.b2) * (g * g)
        u = (m / bc1) / (np.sqrt(v) / math.sqrt(bc2) + self.eps)
        for a, b in self.decay if self.wd else ():
            u[a:b] += self.wd * w[a:b]
        squares = np.array([[sum(sum_squares(x[a:b]) for a, b in pieces) for x in (w, u)]
                            for pieces in self.tensors]).reshape(-1, 2)
        if self.norms is not None:
            squares = self.norms(squares)
        for pieces, (ww, uu) in zip(self.tensors, squares):
            ratio = math.sqrt(ww) / math.sqrt(uu) if ww > 0 and uu > 0 else 1.0
            for a, b in pieces:
                w[a:b] -= (lr * ratio) * u[a:b]


class MasterLamb(MasterAdamW, Lamb):
    """LAMB on fp32 master weights of 16-bit parameters: MasterAdamW's copy and rounding
    around Lamb's step."""
