"""AdamW on a flat buffer, with PyTorch's semantics (torch.optim.AdamW, foreach=False).

For step t = 1, 2, ... with gradient g, learning rate lr and decay mask w (1 on 2-D weights):

    p <- p * (1 - lr * wd * w)                        decoupled weight decay, first
    m <- b1 m + (1 - b1) g                            v <- b2 v + (1 - b2) g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)     eps outside the sqrt

Any contiguous slice of (p, g, m, v, w) can be updated on its own with the same result,
which is what ZeRO's sharded update relies on.
"""

from __future__ import annotations

import math

import numpy as np


class AdamW:
    def __init__(self, params: np.ndarray, grads: np.ndarray, decay_mask: np.ndarray, *,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.p, self.g, self.w = params, grads, decay_mask
        self.b1, self.b2 = betas
        self.eps, self.wd = eps, weight_decay
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.t = 0

    def step(self, lr: float) -> None:
        self.t += 1
        p, g, m, v = self.p, self.g, self.m, self.v
        if self.wd:
            p *= 1.0 - (lr * self.wd) * self.w
        m *= self.b1
        m += (1.0 - self.b1) * g
        v *= self.b2
        v += (1.0 - self.b2) * (g * g)
        bc1 = 1.0 - self.b1 ** self.t
        bc2 = 1.0 - self.b2 ** self.t
        denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
        p -= (lr / bc1) * (m / denom)

    def state_dict(self) -> dict:
        return {"t": self.t, "exp_avg": self.m, "exp_avg_sq": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.m[...] = state["exp_avg"]
        self.v[...] = state["exp_avg_sq"]
