"""Learning rate at iteration it (0-based): linear warm-up, then decay to min_lr.

    it <  W:           lr = max_lr * (it + 1) / W
    W <= it < D:       r = (it - W) / (D - W)
                       cosine:   min_lr + (max_lr - min_lr) * (1 + cos(pi r)) / 2
                       linear:   max_lr - (max_lr - min_lr) * r
                       constant: max_lr
    it >= D:           min_lr  (constant: max_lr)

D is --lr-decay-iters (default: --train-iters).
"""

from __future__ import annotations

import math


def learning_rate(it: int, *, lr: float, min_lr: float, warmup: int, decay_iters: int,
                  style: str) -> float:
    if it < warmup:
        return lr * (it + 1) / warmup
    if style == "constant":
        return lr
    if it >= decay_iters:
        return min_lr
    r = (it - warmup) / max(1, decay_iters - warmup)
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))
    if style == "linear":
        return lr - (lr - min_lr) * r
    raise ValueError(f"unknown decay style {style!r}")
