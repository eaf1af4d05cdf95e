"""Learning rate of iteration it (0-based: the rate the it-th optimizer step uses), step for
step as Megatron-LM's OptimizerParamScheduler (megatron/core/optimizer_param_scheduler.py)
with --lr-warmup-iters, so that loss curves compare with Megatron's runs:

    W > 0 and it <= W:     lr = init + (max_lr - init) * it / W     (init: --lr-warmup-init, 0)
    constant style:        lr = max_lr
    it > D:                lr = min_lr
    W < it <= D:           r = (it - W) / (D - W)
                           cosine:  min_lr + (max_lr - min_lr) * (1 + cos(pi r)) / 2
                           linear:  max_lr - (max_lr - min_lr) * r

D is --lr-decay-iters (default: --train-iters). Megatron's scheduler counts samples, its
warm-up and decay lengths being iterations x the global batch; the ratios are the same. So
the first step runs at init (0 by default: it updates AdamW's moments, not the weights), the
peak is reached at iteration W, and the rate is min_lr from iteration D on. (With W >= D the
warm-up runs to the end.)
"""

from __future__ import annotations

import math


def learning_rate(it: int, *, lr: float, min_lr: float, warmup: int, decay_iters: int,
                  style: str, init: float = 0.0) -> float:
    if warmup > 0 and it <= warmup:
        return init + (lr - init) * it / warmup
    if style == "constant":
        return lr
    if it > decay_iters:
        return min_lr
    r = (it - warmup) / (decay_iters - warmup)
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))
    if style == "linear":
        return lr - (lr - min_lr) * r
    raise ValueError(f"unknown decay style {style!r}")
