"""Full activation recomputation (Megatron's ``--recompute-granularity full``): chunks of
consecutive blocks that keep only the chunk's input for backward and run their forward again
there.

    forward     y = B_{k+n-1}(... B_k(x)); the blocks save nothing, the chunk keeps x and
                the dropout key (a Checkpoint)
    backward    at the chunk's last block (the first its backward reaches): B_k ... B_{k+n-1}
                again from x, saving as usual; then each block's backward as without
                recomputation

``--recompute-method uniform`` cuts every block of a model chunk into chunks of
``--recompute-num-layers`` blocks (the last one shorter where that does not divide); ``block``
recomputes the first ``--recompute-num-layers`` blocks each on its own (Megatron's two
methods). Memory: one [B, T, C] input per chunk and micro-batch in flight, in place of every
intermediate the blocks' layers save (Korthikanti et al.: 2sbh bytes in 16 bits, against
sbh(34 + 5as/h) per layer), and, during a chunk's backward, its n blocks' activations at
once; time: one more forward of each block, about a third of its forward and backward.

The second forward is the first one's arithmetic on the same input: the kernels are
deterministic, dropout draws its masks from the (step, sample ids) key and the layer's name
(refgpt.nn.dropout), and a tensor-parallel layout repeats the same collectives on the same
operands. So the gradients are bit for bit those of the run without recomputation, which
the tests check in every layout. Under ZeRO-3 the rerun holds each block's parameters as its
forward did (a chunk's earlier blocks are gathered once more, as in any ZeRO-3 recomputation).
"""

from __future__ import annotations

import numpy as np

from .layer import Layer


class Checkpoint(Layer):
    """A chunk's input and dropout key, kept for its backward; rerun() runs the chunk's
    forward again from them, its blocks saving as usual. hold: the parameters' hold
    (refgpt.nn.params.Params.hold)."""

    def __init__(self, blocks, hold):
        super().__init__()
        self.blocks, self.hold = blocks, hold

    def rerun(self) -> None:
        x, key = self.saved()
        y = x
        for block in self.blocks:
            with self.hold(block.unit, "forward"):
                y = block.forward(y, key)
        self.on_recompute((x,))

    def on_recompute(self, held) -> None:
        """Called when the chunk's activations exist again, with the arrays this backward
        holds besides them (refgpt.nn.activations counts the moment)."""


class Recomputed(Layer):
    """A Block of a recomputed chunk: its forward saves nothing (the chunk's first block keeps
    the chunk's input in the Checkpoint), and the chunk's last block reruns the chunk's forward
    at the start of its backward. Evaluation and generation run the block as it is."""

    def __init__(self, block, checkpoint: Checkpoint, first: bool, last: bool):
        super().__init__()
        self.block, self.checkpoint, self.first, self.last = block, checkpoint, first, last
        self.index, self.unit = block.index, block.unit
        self.layers = ([checkpoint] if first else []) + block.layers  # set_grad_enabled, count

    def forward(self, x: np.ndarray, key=None, cache=None, record: dict | None = None):
        if not self.keep or cache is not None or record is not None:
            return self.block.forward(x, key, cache, record)
        if self.first:
            self.checkpoint.save(x, key)
        for layer in self.block.layers:                 # this forward saves nothing
            layer.keep = False
        try:
            return self.block.forward(x, key)
        finally:
            for layer in self.block.layers:
                layer.keep = True

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self.last:
            self.checkpoint.rerun()                     # the chunk's forward, saved this time
        return self.block.backward(dy)


def recomputed(blocks: list, count: int, chunk: int, hold) -> list:
    """The blocks with the first `count` of them recomputed in chunks of `chunk` blocks."""
    out = []
    for lo in range(0, count, chunk):
        part = blocks[lo:min(lo + chunk, count)]
        point = Checkpoint(part, hold)
        out += [Recomputed(b, point, i == 0, i == len(part) - 1) for i, b in enumerate(part)]
    return out + blocks[count:]


def watch_recomputation(blocks, meter) -> None:
    """meter.sample(held) at each moment a chunk's (or an attention core's) recomputed
    activations exist: the peak of a recomputed layer's memory is inside its backward."""
    for block in blocks:
        inner = block.block if isinstance(block, Recomputed) else block
        inner.attn.on_recompute = meter.sample
        if isinstance(block, Recomputed) and block.first:
            block.checkpoint.on_recompute = meter.sample
