"""The manual-autograd contract shared by every layer.

``forward(x)`` computes the output and *saves* what its backward needs; ``backward(dy)``
takes the oldest saved context, returns ``dx`` and accumulates (``+=``) into the layer's
parameter gradients. Saved contexts form a FIFO, one entry per forward still awaiting its
backward, so several micro-batches can be in flight (gradient accumulation, and pipeline
schedules where forwards run ahead of backwards); ``len(layer.stash)`` is that number.
With ``keep = False`` (evaluation, generation) nothing is saved.
"""

from __future__ import annotations

from collections import deque


class Layer:
    def __init__(self):
        self.stash: deque = deque()
        self.keep = True

    def save(self, *tensors) -> None:
        if self.keep:
            self.stash.append(tensors)

    def saved(self) -> tuple:
        if not self.stash:
            raise RuntimeError(f"{type(self).__name__}.backward without a saved forward")
        return self.stash.popleft()
