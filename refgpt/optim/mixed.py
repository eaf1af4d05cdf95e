"""AdamW on fp32 master weights of 16-bit parameters (mixed precision's optimizer: Megatron's
Float16OptimizerWithFloat16Params, DeepSpeed's FP16_Optimizer).

A 16-bit run keeps two copies of the parameters this rank updates (its shard, with ZeRO):

    p16     the working copy the model computes with (2 bytes per element)
    master  fp32, made from p16 once at the start (then from checkpoints) and owned here

and a step is, on the shard, with fp32 gradients g (bfloat16 ones, with
--grad-reduce-in-bf16, are widened chunk by chunk):

    AdamW(master, g)          in fp32, with fp32 moments (refgpt.optim.adamw)
    p16 <- round(master)      one rounding to nearest even; the sync then spreads p16

Updating p16 directly would lose every step smaller than half a 16-bit ulp of the weight
(lr * 1e-3 against 2^-8 relative for bfloat16: most of them). The master weights are what a
checkpoint saves as the parameters, in fp32, so a float32 run loads a 16-bit run's checkpoint
and the reverse, and a resumed 16-bit run continues bit for bit.

Per parameter, with fp32 gradients: 2 (p16) + 4 (g) + 4 (master) + 8 (moments) = 18 bytes;
16 with bfloat16 gradients, the ZeRO paper's (2 + 2 + K) with K = 12.
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .adamw import AdamW


class MasterAdamW(AdamW):
    """AdamW whose parameters (``p``) are an fp32 master copy of the 16-bit ``model_params``,
    which every step rounds the update into."""

    def __init__(self, model_params: np.ndarray, grads: np.ndarray, decay, **kwargs):
        self.model_params = model_params
        super().__init__(model_params.astype(np.float32), grads, decay, **kwargs)

    def step(self, lr: float) -> None:
        super().step(lr)
        self.round_to_model()

    def round_to_model(self) -> None:
        """p16 <- round(master) (after a step, and after a checkpoint set the master)."""
        round_into(self.model_params, self.p)


@kernel(numba="numba_half", half=("numba",))
def round_into(out: np.ndarray, x: np.ndarray) -> None:
    """out (16-bit) <- x rounded to nearest even."""
    out[...] = x
