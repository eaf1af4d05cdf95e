"""Full activation recomputation (Megatron's ``--recompute-granularity full``): a block that
keeps only its input for backward and runs its forward again there.

    forward     y = Block(x); the block saves nothing, this keeps x and the dropout key
    backward    Block(x) again, saving as usual; then dx = Block.backward(dy)

Memory: one [B, T, C] input per recomputed block and micro-batch in flight, in place of every
intermediate the block's layers save (Korthikanti et al.: 2sbh bytes in 16 bits, against
sbh(34 + 5as/h)); time: one more forward of the block, about a third of its forward and
backward.

The second forward is the first one's arithmetic on the same input: the kernels are
deterministic, dropout draws its masks from the (step, sample ids) key and the layer's name
(refgpt.nn.dropout), and a tensor-parallel layout repeats the same collectives on the same
operands. So the gradients are bit for bit those of the run without recomputation, which
the tests check in every layout.
"""

from __future__ import annotations

import numpy as np

from .layer import Layer


class Recomputed(Layer):
    """A Block whose backward reruns its forward (evaluation and generation run it as is)."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.index, self.unit = block.index, block.unit
        self.layers = block.layers                      # set_grad_enabled reaches them too

    def forward(self, x: np.ndarray, key=None, cache=None, record: dict | None = None):
        if not self.keep or cache is not None or record is not None:
            return self.block.forward(x, key, cache, record)
        self.save(x, key)
        for layer in self.layers:                       # this forward saves nothing
            layer.keep = False
        try:
            return self.block.forward(x, key)
        finally:
            for layer in self.layers:
                layer.keep = True

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x, key = self.saved()
        self.block.forward(x, key)                      # the same forward, saved this time
        return self.block.backward(dy)
