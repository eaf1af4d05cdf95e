"""Global-norm gradient clipping, as torch.nn.utils.clip_grad_norm_:

    norm = sqrt(sum over every gradient element of g^2)
    c = max_norm / (norm + 1e-6);   if c < 1:  g <- g * c

On one process the flat gradient buffer holds every element once. Parallel layouts sum the
squares of their own shards and all-reduce that sum (replicated elements counted once).
"""

from __future__ import annotations

import math

import numpy as np


def grad_norm(grad: np.ndarray) -> float:
    g = grad.astype(np.float64, copy=False)
    return math.sqrt(float(np.dot(g, g)))


def clip_grad_(grad: np.ndarray, max_norm: float, norm: float) -> None:
    """Scale grad in place so its global norm is at most max_norm (0 disables)."""
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            grad *= coef
