"""Layer normalisation over the last (hidden) axis, C features.

Forward, with statistics in two passes (mean first, then the variance of the centred
values, biased: divided by C) and eps inside the square root:

    mu = mean(x)     xc = x - mu     rstd = 1 / sqrt(mean(xc^2) + eps)
    n  = xc * rstd   y = gamma * n + beta

Backward, with dn = gamma * dy:

    dx = rstd * (dn - mean(dn) - n * mean(dn * n))
    dgamma += sum_N dy * n      dbeta += sum_N dy
"""

from __future__ import annotations

import numpy as np

from ..backend import kernel
from .layer import Layer, ParamRef
from .cast import narrow, wide


class LayerNorm(Layer):
    g, gg = ParamRef("weight"), ParamRef("weight", grad=True)
    b, gb = ParamRef("bias"), ParamRef("bias", grad=True)

    def __init__(self, params, prefix: str, eps: float = 1e-5):
        super().__init__()
        self.params = params
        self.param_names = {"weight": f"{prefix}.weight", "bias": f"{prefix}.bias"}
        self.eps = eps

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, n, rstd = layernorm_forward(x, self.g, self.b, self.eps)
        self.save(n, rstd)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        n, rstd = self.saved()
        dx, dg, db = layernorm_backward(dy, n, rstd, self.g)
        self.gg += dg
        self.gb += db
        return dx


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def layernorm_forward(x, g, b, eps: float):
    """(y, n, rstd) for x [..., C]: the output, the normalised input and 1/std [..., 1]. For a
    16-bit x computed in fp32: y and n rounded to x's type, rstd kept in fp32."""
    xw = wide(x)
    mu = xw.mean(axis=-1, keepdims=True)                            # [..., 1]
    xc = xw - mu                                                    # [..., C]
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    n = xc * rstd                                                   # [..., C]
    return narrow(n * wide(g) + wide(b), x.dtype), narrow(n, x.dtype), rstd


@kernel(numba="numba_cpu", cupy="cupy_gpu", half=("numba", "cupy"))
def layernorm_backward(dy, n, rstd, g):
    """(dx, dgamma, dbeta) from dy and the forward's n and rstd; for 16-bit dy and n computed
    in fp32, dx rounded to dy's type, dgamma and dbeta left in fp32 (the gradient buffer's)."""
    dyw, n = wide(dy), wide(n)
    C = n.shape[-1]
    dg = (dyw * n).reshape(-1, C).sum(axis=0)
    db = dyw.reshape(-1, C).sum(axis=0)
    dn = dyw * wide(g)                                              # [..., C]
    dx = rstd * (dn - dn.mean(axis=-1, keepdims=True) - n * (dn * n).mean(axis=-1, keepdims=True))
    return narrow(dx, dy.dtype), dg, db
