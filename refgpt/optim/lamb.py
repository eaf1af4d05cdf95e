"""LAMB (You et al. 2019, "Large batch optimization for deep learning"): AdamW's moments, and
each tensor's step scaled by its trust ratio, so that every layer moves by a fixed fraction
of its own norm however large the global batch (and the learning rate) grows.

For step t, with gradient g, on each parameter tensor w (a run of the flat buffer), with
AdamW's conventions (refgpt.optim.adamw: bias corrections, eps outside the square root):

    m <- b1 m + (1 - b1) g                     v <- b2 v + (1 - b2) g^2
    u  = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)  +  wd w   (wd on decayed tensors)
    r  = ||w|| / ||u||     (1 where either norm is 0)
    w <- w - lr r u

The decay enters u (LAMB's "coupled into the update" form, as NVIDIA's FusedLAMB and
DeepSpeed's), not as AdamW's separate shrink. The trust ratio needs each whole tensor on the
rank: data and pipeline parallelism keep them whole; tensor parallelism and ZeRO, which split
tensors, are refused for now (refgpt.parallel.build).
"""

from __future__ import annotations

import math

import numpy as np

from .adamw import AdamW


class Lamb(AdamW):
    def __init__(self, params: np.ndarray, grads: np.ndarray, decay: list[tuple[int, int]],
                 tensors: list[tuple[int, int]], **kwargs):
        """tensors: the (start, stop) range of every parameter tensor in the buffer."""
        super().__init__(params, grads, decay, **kwargs)
        self.tensors = sorted(tensors)
        self.decayed = set(map(tuple, self.decay))

    def step(self, lr: float) -> None:
        self.t += 1
        bc1, bc2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        for a, b in self.tensors:
            w, m, v = self.p[a:b], self.m[a:b], self.v[a:b]
            g = self.g[a:b].astype(w.dtype, copy=False)
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            u = (m / bc1) / (np.sqrt(v) / math.sqrt(bc2) + self.eps)
            if self.wd and (a, b) in self.decayed:
                u += self.wd * w
            w_norm, u_norm = float(np.linalg.norm(w)), float(np.linalg.norm(u))
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            w -= (lr * ratio) * u
