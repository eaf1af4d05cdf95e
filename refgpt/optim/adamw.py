"""AdamW on a flat buffer, with PyTorch's semantics (torch.optim.AdamW, foreach=False).

For step t = 1, 2, ... with gradient g and learning rate lr, on the parameters AdamW decays
(the 2-D weights; given as index ranges of the buffer):

    p <- p * (1 - lr * wd)                            decoupled weight decay, first
    m <- b1 m + (1 - b1) g                            v <- b2 v + (1 - b2) g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)     eps outside the sqrt

Every element is updated on its own, so any contiguous slice of (p, g, m, v) can be updated
separately with the same result. ZeRO's sharded update relies on that, and so does the
streamed update here: the buffer is processed ``chunk`` elements at a time, which bounds the
temporaries and lets the moments live in np.memmap files (optimizer offload) that are read
and written one chunk at a time.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import kernel

CHUNK = 1 << 20


class AdamW:
    def __init__(self, params: np.ndarray, grads: np.ndarray, decay: list[tuple[int, int]], *,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 moments: tuple[np.ndarray, np.ndarray] | None = None, chunk: int = CHUNK):
        """decay: (start, stop) ranges of the buffer to decay; moments: arrays (m, v) to hold
        the state (np.memmap files, say) instead of new zeroed ones."""
        self.p, self.g, self.decay = params, grads, sorted(decay)
        self.b1, self.b2 = betas
        self.eps, self.wd = eps, weight_decay
        self.m, self.v = moments if moments is not None else (np.zeros_like(params),
                                                               np.zeros_like(params))
        self.chunk = chunk
        self.t = 0

    def step(self, lr: float) -> None:
        self.t += 1
        for lo in range(0, len(self.p), self.chunk):
            self._update(lo, min(lo + self.chunk, len(self.p)), lr)
        for state in (self.m, self.v):
            if isinstance(state, np.memmap):
                state.flush()

    def _update(self, lo: int, hi: int, lr: float) -> None:
        bc1, bc2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        for a, b, keep in self._runs(lo, hi, 1.0 - lr * self.wd):
            g = self.g[a:b].astype(self.p.dtype, copy=False)     # bf16 gradients: widened
            adamw_update(self.p[a:b], g, self.m[a:b], self.v[a:b], lr, self.b1,
                         self.b2, self.eps, bc1, bc2, keep)

    def _runs(self, lo: int, hi: int, keep: float):
        """[lo, hi) cut into runs (a, b, factor): the decay factor `keep` inside the decayed
        ranges, 1 outside (with no weight decay, one run)."""
        start = lo
        for a, b in self.decay if self.wd else ():
            a, b = max(a, lo), min(b, hi)
            if a >= b:
                continue
            if start < a:
                yield start, a, 1.0
            yield a, b, keep
            start = b
        if start < hi:
            yield start, hi, 1.0

    @property
    def extra_bytes(self) -> int:
        """State held beyond the moments and what they update (none here)."""
        return 0

    def state_dict(self) -> dict:
        return {"t": self.t, "exp_avg": self.m, "exp_avg_sq": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.m[...] = state["exp_avg"]
        self.v[...] = state["exp_avg_sq"]


@kernel(numba="numba_cpu", cupy="cupy_gpu")
def adamw_update(p, g, m, v, lr: float, b1: float, b2: float, eps: float, bc1: float,
                 bc2: float, keep: float = 1.0) -> None:
    """The decay (p *= keep, keep = 1 - lr wd), the moment updates and the step, in place
    (bc1, bc2: the bias corrections)."""
    if keep != 1.0:
        p *= keep
    m *= b1
    m += (1.0 - b1) * g
    v *= b2
    v += (1.0 - b2) * (g * g)
    denom = np.sqrt(v) / math.sqrt(bc2) + eps
    p -= (lr / bc1) * (m / denom)
