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


class Sequence:
    """Layers applied one after another (forward in order, backward in reverse), as one layer:
    what a parallel layout supplies where the single process has one layer (a linear layer
    with the communication that enters or leaves a tensor-parallel region, say)."""

    def __init__(self, *steps):
        self.steps = steps
        self.layers = primitives(*steps)

    def forward(self, x):
        for step in self.steps:
            x = step.forward(x)
        return x

    def backward(self, dy):
        for step in reversed(self.steps):
            dy = step.backward(dy)
        return dy


def primitives(*modules) -> list[Layer]:
    """Every Layer in modules and in what they are built of (their ``layers`` lists), in
    order: the layers that keep a stash (``set_grad_enabled`` and the stash count walk them)."""
    out = []
    for m in modules:
        if isinstance(m, Layer):
            out.append(m)
        out += getattr(m, "layers", [])
    return out
