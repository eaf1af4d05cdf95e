"""Global-norm gradient clipping, as torch.nn.utils.clip_grad_norm_:

    norm = sqrt(sum over every gradient element of g^2)
    c = max_norm / (norm + 1e-6);   if c < 1:  g <- g * c

On one process the flat gradient buffer holds every element once. Parallel layouts sum the
squares of their own shards and all-reduce that sum (replicated elements counted once).
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import kernel

CHUNK = 1 << 20


@kernel(numba="numba_cpu")
def sum_squares(a: np.ndarray) -> float:
    """sum(a^2) accumulated in float64, a chunk at a time (no float64 copy of all of a): the
    chunks' sums added in order."""
    flat, total = a.reshape(-1), 0.0
    for lo in range(0, flat.size, CHUNK):
        part = flat[lo:lo + CHUNK].astype(np.float64, copy=False)
        total += float(np.dot(part, part))
    return total


def grad_norm(grad: np.ndarray) -> float:
    return math.sqrt(sum_squares(grad))


def clip_coefficient(max_norm: float, norm: float) -> float:
    """The factor that brings a gradient of this norm to at most max_norm (0 disables): 1 or
    less."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0


def clip_grad_(grad: np.ndarray, max_norm: float, norm: float) -> None:
    """Scale grad in place so its global norm is at most max_norm (0 disables)."""
    coef = clip_coefficient(max_norm, norm)
    if coef < 1.0:
        grad *= coef
