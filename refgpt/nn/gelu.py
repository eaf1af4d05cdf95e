"""GELU activation, tanh approximation (GPT-2's; Hugging Face's "gelu_new") or exact erf.

tanh form, with u = sqrt(2/pi) (x + 0.044715 x^3), t = tanh(u):

    y     = x/2 (1 + t)
    dy/dx = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

sech^2(u) is computed as 1 - t^2 (through cosh it would overflow in float32 for |u| > ~89).

erf form: y = x Phi(x), dy/dx = Phi(x) + x phi(x), with Phi the normal CDF.

BiasGELU is GELU with the bias of the layer before it (the MLP's c_fc, computed without its
bias) folded in: y = gelu(f + b), db = sum over tokens of dy gelu'(f + b). The sums are the
same as Linear's bias followed by GELU; a fused kernel makes the bias add and the bias
gradient part of the passes GELU makes anyway.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from ..backend import kernel
from .layer import Layer, ParamRef
from .linear import column_sum
from .cast import narrow, wide

_S2PI = math.sqrt(2.0 / math.pi)
_K = 0.044715


def check_kind(kind: str) -> str:
    if kind not in ("tanh", "erf"):
        raise ValueError(f"unknown GELU kind {kind!r}")
    return kind


class GELU(Layer):
    def __init__(self, kind: str = "tanh"):
        super().__init__()
        self.kind = check_kind(kind)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.save(x)
        return gelu_forward(x, self.kind)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (x,) = self.saved()
        return gelu_backward(x, dy, self.kind)


class BiasGELU(Layer):
    """y = gelu(f + b) for f = x W from a Linear without bias; b is that Linear's bias."""

    b, gb = ParamRef("bias"), ParamRef("bias", grad=True)

    def __init__(self, params, bias_name: str, kind: str = "tanh"):
        super().__init__()
        self.params, self.param_names = params, {"bias": bias_name}
        self.kind = check_kind(kind)

    def forward(self, f: np.ndarray) -> np.ndarray:
        """f becomes f + b in place (the pre-activation, which backward needs)."""
        y = bias_gelu_forward(f, self.b, self.kind)
        self.save(f)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (x,) = self.saved()
        dx, db = bias_gelu_backward(x, dy, self.kind)
        self.gb += db
        return dx


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def gelu_forward(x: np.ndarray, kind: str) -> np.ndarray:
    """gelu(x); for 16-bit x computed in fp32 and rounded once."""
    xw = wide(x)
    if kind == "tanh":
        y = 0.5 * xw * (1.0 + np.tanh(_S2PI * (xw + _K * xw**3)))
    else:
        y = 0.5 * xw * (1.0 + erf(xw / math.sqrt(2.0)))
    return narrow(y, x.dtype)


def _slope(x: np.ndarray, kind: str) -> np.ndarray:
    """gelu'(x), in x's type."""
    if kind == "tanh":
        t = np.tanh(_S2PI * (x + _K * x**3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _S2PI * (1.0 + 3.0 * _K * x * x)
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _input_grad(x: np.ndarray, dy: np.ndarray, kind: str) -> np.ndarray:
    """dy gelu'(x) in dy's compute type (fp32 for 16 bits), not yet rounded."""
    dyw = wide(dy)
    return dyw * _slope(wide(x), kind).astype(dyw.dtype, copy=False)


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def gelu_backward(x: np.ndarray, dy: np.ndarray, kind: str) -> np.ndarray:
    """dy gelu'(x); for 16-bit operands computed in fp32 and rounded once to dy's type."""
    return narrow(_input_grad(x, dy, kind), dy.dtype)


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def bias_gelu_forward(f: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """gelu(f + b), leaving f + b in f (16 bits: the sum rounded into f, and gelu taken of
    that rounded pre-activation, the one backward sees)."""
    fw = wide(f)
    fw += wide(b)                                 # in place where f is its own compute type
    if fw is not f:
        f[...] = fw
    return gelu_forward(f, kind)


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def bias_gelu_backward(x: np.ndarray, dy: np.ndarray, kind: str):
    """(dx, db): dx = dy gelu'(x), db = dx summed over every axis but the last (16 bits: db
    summed from the fp32 dx, before dx is rounded)."""
    dxw = _input_grad(x, dy, kind)
    return narrow(dxw, dy.dtype), column_sum(dxw.reshape(-1, dxw.shape[-1]))
