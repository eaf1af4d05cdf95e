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


class ParamRef:
    """A layer's parameter (or, with grad=True, its gradient), read from the Params buffers by
    name at each use: ``w = ParamRef("weight")`` on the class, ``self.params`` and
    ``self.param_names = {"weight": "h.0.mlp.c_fc.weight", ...}`` on the instance (a name of
    None reads as None: a layer without that parameter).

    Looking the array up each time, instead of keeping a view made at construction, lets ZeRO
    (refgpt.parallel.zero) give a parameter storage only while it is in use. In-place updates
    (``self.gw += ...``) work; rebinding the attribute to another array is an error.
    """

    def __init__(self, key: str, grad: bool = False):
        self.key, self.grad = key, grad

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        name = layer.param_names[self.key]
        if name is None:
            return None
        return layer.params.grads[name] if self.grad else layer.params[name]

    def __set__(self, layer, value) -> None:
        if value is not self.__get__(layer):             # `x += y` sets back the same array
            raise AttributeError(f"{self.key}: update the parameter array in place")
